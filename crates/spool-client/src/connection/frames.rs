//! What the server sends on an established connection, and what the client does with it:
//! deliveries pass the dedup rule and move their subscription's cursor, answers go to the
//! request waiting for them.

use bytes::Bytes;
use spool_core::{Epoch, Offset, Position};
use spool_protocol::ws::{self, ClientFrame, ServerFrame, close};
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};

use super::{Connection, End, GroupAnswer, handshake::closed};
use crate::{Ack, Error, Event, Message, Subscription};

impl Connection {
    pub(super) async fn incoming(
        &mut self,
        incoming: Option<Result<WsMessage, tungstenite::Error>>,
    ) -> Result<(), End> {
        match incoming {
            None => Err(End::Lost(Error::ConnectionLost(
                "the server closed the connection".into(),
            ))),
            Some(Err(e)) => Err(End::Lost(Error::ConnectionLost(e.to_string()))),
            Some(Ok(WsMessage::Text(text))) => match serde_json::from_str::<ServerFrame>(&text) {
                Ok(frame) => self.frame(frame).await,
                Err(e) => {
                    self.warn(Error::Protocol(format!("unreadable frame: {e}")))
                        .await
                }
            },
            Some(Ok(WsMessage::Close(frame))) => {
                let error = closed(frame);
                match &error {
                    Error::Closed { code, .. } if !close::should_reconnect(*code) => {
                        Err(End::Fatal(error))
                    }
                    _ => Err(End::Lost(error)),
                }
            }
            // WebSocket-level pings are answered by tungstenite; binary frames are not
            // part of this protocol.
            Some(Ok(_)) => Ok(()),
        }
    }

    async fn frame(&mut self, frame: ServerFrame) -> Result<(), End> {
        match frame {
            ServerFrame::Message(delivery) => self.deliver(delivery).await,
            ServerFrame::Subscribed(subscribed) => {
                let Some(sub) = self.subs.get(&subscribed.stream) else {
                    return Ok(()); // unsubscribed since
                };
                if subscribed.id.is_some() && sub.pending != subscribed.id {
                    return Ok(()); // the answer to an earlier subscribe of the same stream
                }
                match subscription(&subscribed) {
                    Ok(info) => self.confirm(info).await,
                    Err(error) => self.warn(error).await,
                }
            }
            ServerFrame::Reset(reset) => {
                let Some(sub) = self.subs.get_mut(&reset.stream) else {
                    return Ok(());
                };
                let position = match reset.position.parse::<Position>() {
                    Ok(p) => p,
                    Err(e) => return self.warn(bad_position("reset", e)).await,
                };
                sub.cursor.reset(position.clone());
                self.emit(Event::Reset {
                    stream: reset.stream,
                    reason: reset.reason,
                    position,
                })
                .await
            }
            ServerFrame::Skipped(skipped) => {
                let Some(sub) = self.subs.get_mut(&skipped.stream) else {
                    return Ok(());
                };
                let epoch = match Epoch::parse(&skipped.epoch) {
                    Ok(e) => e,
                    Err(e) => return self.warn(bad_position("skipped", e)).await,
                };
                if !sub.cursor.skip(&epoch, Offset(skipped.through)) {
                    return Ok(());
                }
                self.emit(Event::Skipped {
                    stream: skipped.stream,
                    epoch,
                    after: Offset(skipped.after),
                    through: Offset(skipped.through),
                    count: skipped.count,
                })
                .await
            }
            ServerFrame::Ack(ack) => {
                let Some(publish) = ack.id.and_then(|id| self.publishes.remove(&id)) else {
                    return Ok(());
                };
                let answer = match Epoch::parse(&ack.epoch) {
                    Ok(epoch) => Ok(Ack {
                        stream: ack.stream,
                        position: Position::new(epoch, Offset(ack.offset)),
                        duplicate: ack.duplicate,
                    }),
                    Err(e) => Err(bad_position("ack", e)),
                };
                let _ = publish.reply.send(answer);
                Ok(())
            }
            ServerFrame::Refreshed(refreshed) => {
                if let Some(refresh) = refreshed.id.and_then(|id| self.refreshes.remove(&id)) {
                    self.token = Some(refresh.token);
                    let _ = refresh.reply.send(Ok(refreshed.expires_at));
                }
                Ok(())
            }
            ServerFrame::Error(error) => self.error(error).await,
            ServerFrame::Unsubscribed(unsubscribed) => {
                // With an id it answers our own unsubscribe, already forgotten.
                if unsubscribed.id.is_none() && self.subs.remove(&unsubscribed.stream).is_some() {
                    self.emit(Event::Unsubscribed {
                        stream: unsubscribed.stream,
                        reason: unsubscribed.reason,
                    })
                    .await?;
                }
                Ok(())
            }
            ServerFrame::Ping(_) => self.feed(ClientFrame::Pong(ws::Ping {})).await,
            ServerFrame::Pong(_) => Ok(()),
            ServerFrame::Reconnect(reconnect) => {
                self.going_away = Some(reconnect.reason);
                Ok(())
            }
            ServerFrame::Consuming(consuming) => {
                let Some(id) = consuming.id else {
                    return Ok(());
                };
                let key = (consuming.stream, consuming.group);
                if let Some(consume) = self.consumes.get_mut(&key)
                    && consume.pending == Some(id)
                {
                    consume.pending = None;
                    if let Some(waiter) = consume.waiter.take() {
                        let _ = waiter.send(Ok(()));
                    }
                } else if let Some(GroupAnswer::Done(reply)) = self.group_answers.remove(&id) {
                    let _ = reply.send(Ok(()));
                }
                Ok(())
            }
            ServerFrame::Leased(leased) => {
                if !self
                    .consumes
                    .contains_key(&(leased.stream.clone(), leased.group.clone()))
                {
                    return Ok(()); // stopped since: the server gives it back
                }
                self.emit(Event::Leased(leased)).await
            }
            ServerFrame::Settled(settled) => {
                if let Some(GroupAnswer::Settled(reply)) =
                    settled.id.and_then(|id| self.group_answers.remove(&id))
                {
                    let _ = reply.send(Ok(settled.results));
                }
                Ok(())
            }
            ServerFrame::GroupReset(reset) => self.emit(Event::GroupReset(reset)).await,
            ServerFrame::Stopped(stopped) => {
                if let Some(GroupAnswer::Done(reply)) =
                    stopped.id.and_then(|id| self.group_answers.remove(&id))
                {
                    let _ = reply.send(Ok(()));
                }
                if stopped.reason.is_some()
                    && self
                        .consumes
                        .remove(&(stopped.stream.clone(), stopped.group.clone()))
                        .is_some()
                {
                    self.emit(Event::ConsumeStopped {
                        stream: stopped.stream,
                        group: stopped.group,
                        reason: stopped.reason,
                    })
                    .await?;
                }
                Ok(())
            }
            ServerFrame::Connected(_) => {
                self.warn(Error::Protocol("a second `connected`".into()))
                    .await
            }
        }
    }

    async fn deliver(&mut self, delivery: ws::Delivery) -> Result<(), End> {
        let Some(sub) = self.subs.get_mut(&delivery.stream) else {
            return Ok(()); // unsubscribed since
        };
        let epoch = match Epoch::parse(&delivery.epoch) {
            Ok(e) => e,
            Err(e) => return self.warn(bad_position("message", e)).await,
        };
        let offset = Offset(delivery.offset);
        if !sub.cursor.admit(&epoch, offset) {
            return Ok(()); // already delivered before a reconnect
        }
        let payload = match (delivery.data, delivery.data_base64) {
            (Some(text), _) => Bytes::from(text),
            (None, Some(b64)) => {
                use base64::Engine as _;
                match base64::engine::general_purpose::STANDARD.decode(b64) {
                    Ok(bytes) => Bytes::from(bytes),
                    Err(e) => {
                        let error = Error::Protocol(format!(
                            "message {epoch}:{offset} of {}: bad base64: {e}",
                            delivery.stream
                        ));
                        return self.warn(error).await;
                    }
                }
            }
            (None, None) => Bytes::new(),
        };
        self.emit(Event::Message(Message {
            stream: delivery.stream,
            position: Position::new(epoch, offset),
            time: delivery.time,
            payload,
            content_type: delivery.content_type,
            key: delivery.key,
            headers: delivery.headers,
        }))
        .await
    }

    /// An `error` frame: the answer to a request, or news about the connection.
    async fn error(&mut self, frame: ws::ErrorFrame) -> Result<(), End> {
        let error = Error::server(frame.code, frame.message);
        if let Some(id) = frame.id {
            if let Some(publish) = self.publishes.remove(&id) {
                let _ = publish.reply.send(Err(error));
                return Ok(());
            }
            if let Some(refresh) = self.refreshes.remove(&id) {
                let _ = refresh.reply.send(Err(error));
                return Ok(());
            }
            match self.group_answers.remove(&id) {
                Some(GroupAnswer::Done(reply)) => {
                    let _ = reply.send(Err(error));
                    return Ok(());
                }
                Some(GroupAnswer::Settled(reply)) => {
                    let _ = reply.send(Err(error));
                    return Ok(());
                }
                None => {}
            }
            let refused = self
                .consumes
                .iter()
                .find(|(_, c)| c.pending == Some(id))
                .map(|(key, _)| key.clone());
            if let Some(key) = refused
                && let Some(consume) = self.consumes.remove(&key)
            {
                match consume.waiter {
                    Some(waiter) => {
                        let _ = waiter.send(Err(error));
                    }
                    // A consume sent again after a reconnect was refused (the group is
                    // gone, or the token no longer allows it): it is over.
                    None => {
                        self.emit(Event::ConsumeStopped {
                            stream: key.0,
                            group: key.1,
                            reason: Some(frame.code.as_str().to_owned()),
                        })
                        .await?;
                    }
                }
                return Ok(());
            }
            let refused = self
                .subs
                .iter()
                .find(|(_, sub)| sub.pending == Some(id))
                .map(|(stream, _)| stream.clone());
            if let Some(stream) = refused
                && let Some(sub) = self.subs.remove(&stream)
            {
                match sub.waiter {
                    Some(waiter) => {
                        let _ = waiter.send(Err(error));
                    }
                    // A re-subscribe after a reconnect was refused (e.g. the token no
                    // longer allows the stream): the subscription is over.
                    None => {
                        self.emit(Event::Unsubscribed {
                            stream,
                            reason: Some(frame.code.as_str().to_owned()),
                        })
                        .await?;
                    }
                }
                return Ok(());
            }
        }
        self.warn(error).await
    }
}

pub(super) fn subscription(frame: &ws::Subscribed) -> Result<Subscription, Error> {
    let position = frame
        .position
        .parse()
        .map_err(|e| bad_position("subscribed", e))?;
    let head = frame
        .head
        .parse()
        .map_err(|e| bad_position("subscribed", e))?;
    Ok(Subscription {
        stream: frame.stream.clone(),
        position,
        head,
    })
}

fn bad_position(frame: &str, e: spool_core::InvalidPosition) -> Error {
    Error::Protocol(format!("a `{frame}` with a bad position: {e}"))
}
