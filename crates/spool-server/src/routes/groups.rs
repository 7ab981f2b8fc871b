//! Consumer groups over HTTP (SPEC §7, docs/http-api.md "Consumer groups"): thin handlers
//! over `delivery::groups`.
//!
//! Each handler checks, in order: the credential, the names in the path, the caller's
//! `consume` right on the stream (and `publish` where the call publishes: an explicit
//! dead-letter stream, redrive), that this server keeps groups (`501 groups_unavailable`
//! otherwise), and only then reads the body (bounded by [`MAX_BODY`] and `--body-timeout`).

use std::{sync::Arc, time::Duration};

use axum::{
    Json,
    body::{Body, Bytes},
    extract::{Path, RawQuery, State, rejection::PathRejection},
    http::{HeaderMap, HeaderValue, StatusCode, header::CONTENT_TYPE},
    response::{IntoResponse, Response},
};
use serde::de::DeserializeOwned;
use spool_core::{
    StreamName,
    group::{
        GroupName, GroupStats, MemberName, ReceiveRequest as CoreReceive,
        receive::{MAX_RECEIPTS, OpError},
    },
};
use spool_protocol::groups::{
    AckRequest, ExtendRequest, GroupConfigSpec, GroupInfo, GroupList, GroupListEntry,
    GroupResetBody, GroupStatsBody, MemberStatsBody, NackRequest, ReceiptOutcome, ReceiveRequest,
    RedriveResponse, SettleResponse, TerminateRequest,
};
use tokio::time::Instant;

use super::{OnStream, authenticate, publish::read_body};
use crate::{
    AppState,
    auth::{Action, Principal},
    delivery::groups::{GroupView, Groups, ReceiveAnswer, Settle},
    error::{ApiError, ApiResult},
    query::QueryParams,
};

/// Largest request body of a group call: 1,000 receipts fit with room to spare.
pub const MAX_BODY: usize = 256 * 1024;

type GroupPath = Result<Path<(String, String)>, PathRejection>;

/// The caller, the stream and the group of a request, checked; and the driver.
struct Call {
    principal: Principal,
    stream: StreamName,
    group: GroupName,
    groups: Arc<Groups>,
}

fn group_name(raw: &str) -> ApiResult<GroupName> {
    let group = GroupName::new(raw).map_err(|e| {
        let shown: String = raw.chars().take(64).collect();
        ApiError::invalid_group_name(format!("invalid group name {shown:?}: {e}"))
    })?;
    Groups::check_user_name(&group)
        .map_err(|e| ApiError::invalid_group_name(format!("{:?}: {e}", group.as_str())))?;
    Ok(group)
}

fn driver(state: &AppState) -> ApiResult<Arc<Groups>> {
    state
        .groups
        .clone()
        .ok_or_else(|| ApiError::groups_unavailable(state.engine.name()))
}

fn call(
    state: &AppState,
    path: GroupPath,
    query: Option<String>,
    headers: &HeaderMap,
) -> ApiResult<Call> {
    let query = QueryParams::parse(query.as_deref())?;
    let principal = authenticate(state, headers, &query)?;
    let Path((stream, group)) = path.map_err(|e| ApiError::bad_param(format!("bad path: {e}")))?;
    let stream = StreamName::new(&stream).map_err(|e| ApiError::invalid_name(&stream, e))?;
    let group = group_name(&group)?;
    principal.check(Action::Consume, &stream)?;
    let groups = driver(state)?;
    Ok(Call {
        principal,
        stream,
        group,
        groups,
    })
}

async fn body<T: DeserializeOwned>(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
    shape: &str,
) -> ApiResult<T> {
    let bytes = read_body(body, headers, MAX_BODY, &state.config).await?;
    parse(&bytes, shape)
}

fn parse<T: DeserializeOwned>(bytes: &Bytes, shape: &str) -> ApiResult<T> {
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        bytes
    };
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_body(format!("the body must be {shape}: {e}")))
}

/// `PUT /v1/streams/{stream}/groups/{group}`: create (201) or update (200).
pub async fn put(
    State(state): State<AppState>,
    path: GroupPath,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    raw: Body,
) -> ApiResult<(StatusCode, Json<GroupInfo>)> {
    let c = call(&state, path, query, &headers)?;
    let spec: GroupConfigSpec = body(
        &state,
        &headers,
        raw,
        "the group's settings: {\"start\",\"visibility_timeout\",\"max_deliveries\",\"backoff\",\
         \"max_in_flight\",\"ordering\",\"dead_letter\"}, every field optional",
    )
    .await?;
    // Dead letters are publishes: naming a stream of one's own choice needs the right to
    // publish to it (the default one is the group's own).
    if let Some(name) = &spec.dead_letter {
        let dead = StreamName::new(name).map_err(|e| {
            ApiError::bad_body(format!("dead_letter is not a valid stream name: {e}"))
        })?;
        c.principal.check(Action::Publish, &dead)?;
    }
    let created = c.groups.put(&c.stream, &c.group, &spec).await?;
    let view = c.groups.describe(&c.stream, &c.group).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(info(&c.stream, &c.group, view))))
}

/// `GET /v1/streams/{stream}/groups/{group}`.
pub async fn get(
    State(state): State<AppState>,
    path: GroupPath,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> ApiResult<Json<GroupInfo>> {
    let c = call(&state, path, query, &headers)?;
    let view = c.groups.describe(&c.stream, &c.group).await?;
    Ok(Json(info(&c.stream, &c.group, view)))
}

/// `DELETE /v1/streams/{stream}/groups/{group}`: 204, or 404 when there was none.
pub async fn delete(
    State(state): State<AppState>,
    path: GroupPath,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> ApiResult<StatusCode> {
    let c = call(&state, path, query, &headers)?;
    if c.groups.delete(&c.stream, &c.group).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::group_not_found(
            c.stream.as_str(),
            c.group.as_str(),
        ))
    }
}

/// `GET /v1/streams/{stream}/groups`.
pub async fn list(
    State(state): State<AppState>,
    OnStream {
        principal, stream, ..
    }: OnStream,
) -> ApiResult<Json<GroupList>> {
    principal.check(Action::Consume, &stream)?;
    let groups = driver(&state)?;
    let names = groups.list(&stream).await?;
    Ok(Json(GroupList {
        stream: stream.to_string(),
        groups: names
            .into_iter()
            .map(|g| GroupListEntry {
                group: g.to_string(),
            })
            .collect(),
    }))
}

/// `POST …/receive`. With `ack`, those receipts are acked first: the acks and the first
/// receive round are one commit (`Groups::settle_and_receive`); when that round leases nothing
/// and the request waits, the normal long-poll follows. Once the acks are done the answer
/// reports them, whatever happens to the receive after them.
pub async fn receive(
    State(state): State<AppState>,
    path: GroupPath,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    raw: Body,
) -> ApiResult<Response> {
    let c = call(&state, path, query, &headers)?;
    let r: ReceiveRequest = body(
        &state,
        &headers,
        raw,
        "{\"consumer\",\"max\",\"wait\",\"visibility_timeout\",\"ack\":[…]}",
    )
    .await?;
    let member = MemberName::new(&r.consumer).map_err(|e| ApiError::bad_body(e.to_string()))?;
    let request = CoreReceive {
        member,
        max: r.max.unwrap_or(1),
        visibility_timeout: r.visibility_timeout.map(|d| d.0),
    };
    // Everything refused as a whole is refused before anything is acked.
    request
        .validate()
        .map_err(|e| ApiError::bad_body(e.to_string()))?;
    if let Some(receipts) = &r.ack
        && receipts.len() > MAX_RECEIPTS
    {
        return Err(ApiError::bad_body(
            OpError::TooManyReceipts(receipts.len()).to_string(),
        ));
    }
    // As the long-poll read: a longer wait is shortened to the server's maximum, and a token
    // that expires ends it (nothing is leased to a credential past its expiry).
    let wait = r
        .wait
        .map_or(Duration::ZERO, |d| d.0)
        .min(state.config.max_poll_wait);
    let mut deadline = Instant::now() + wait;
    if let Some(at) = c.principal.expires_at() {
        deadline = deadline.min(Instant::now() + super::sse::until_unix_ms(at));
    }
    let deadline = (!wait.is_zero()).then_some(deadline);
    let (acks, answer) = match r.ack {
        Some(receipts) if !receipts.is_empty() => {
            let (acks, answer) = receive_acking(&state, &c, receipts, &request, deadline).await?;
            (Some(acks), answer)
        }
        // Nothing to ack: a plain receive (an empty `ack` still gets its empty `acks`).
        ack => {
            let answer = c
                .groups
                .receive(&c.stream, &c.group, &request, deadline, &state.shutdown)
                .await?;
            (ack.map(|_| Vec::new()), answer)
        }
    };
    Ok((
        [(CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        receive_body(&state, &c.stream, &answer, acks.as_deref()),
    )
        .into_response())
}

/// The acks of a receive's `ack`, then its receive. An error only when nothing was stored
/// (the acks and the first round failed together); a failure of the long-poll after them is
/// logged and answered as no messages, with the acks' results.
async fn receive_acking(
    state: &AppState,
    c: &Call,
    receipts: Vec<String>,
    request: &CoreReceive,
    deadline: Option<Instant>,
) -> ApiResult<(Vec<ReceiptOutcome>, ReceiveAnswer)> {
    let (results, answer) = c
        .groups
        .settle_and_receive(&c.stream, &c.group, &receipts, &Settle::Ack, request)
        .await?;
    let acks = receipts
        .into_iter()
        .zip(results)
        .map(|(receipt, result)| ReceiptOutcome { receipt, result })
        .collect();
    if !answer.messages.is_empty() || answer.reset.is_some() || deadline.is_none() {
        return Ok((acks, answer));
    }
    let answer = match c
        .groups
        .receive(&c.stream, &c.group, request, deadline, &state.shutdown)
        .await
    {
        Ok(answer) => answer,
        Err(e) => {
            tracing::warn!(
                stream = %c.stream,
                group = %c.group,
                error = %e,
                "a receive after its acks failed; answering the acks with no messages"
            );
            ReceiveAnswer::default()
        }
    };
    Ok((acks, answer))
}

/// The receive answer, around the messages' shared encodings (`delivery::encode`): each
/// message is `{"receipt","deliveries",` followed by the long-poll form's fields; `"acks"`
/// when the request carried `ack`.
fn receive_body(
    state: &AppState,
    stream: &StreamName,
    answer: &ReceiveAnswer,
    acks: Option<&[ReceiptOutcome]>,
) -> Bytes {
    let acked = acks.map_or(0, |a| a.iter().map(|r| r.receipt.len() + 32).sum());
    let mut out = Vec::with_capacity(256 * (answer.messages.len() + 1) + acked);
    out.extend_from_slice(b"{\"messages\":[");
    for (i, leased) in answer.messages.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let body = state
            .encodings
            .body(stream.as_str(), &leased.delivery.epoch, &leased.message);
        out.extend_from_slice(b"{\"receipt\":");
        // Writing a string or a number to a Vec cannot fail.
        let _ = serde_json::to_writer(&mut out, &leased.delivery.receipt.encode());
        out.extend_from_slice(b",\"deliveries\":");
        let _ = serde_json::to_writer(&mut out, &leased.delivery.deliveries);
        out.push(b',');
        // `{"epoch":…}` without its opening brace.
        out.extend_from_slice(&body.as_bytes()[1..]);
    }
    out.push(b']');
    if let Some(reset) = &answer.reset {
        out.extend_from_slice(b",\"reset\":");
        let _ = serde_json::to_writer(&mut out, &GroupResetBody::from(reset));
    }
    if let Some(acks) = acks {
        out.extend_from_slice(b",\"acks\":[");
        for (i, ack) in acks.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(b"{\"receipt\":");
            // A receipt is the client's text, escaped as JSON needs.
            let _ = serde_json::to_writer(&mut out, &ack.receipt);
            out.extend_from_slice(b",\"result\":\"");
            out.extend_from_slice(ack.result.as_str().as_bytes());
            out.extend_from_slice(b"\"}");
        }
        out.push(b']');
    }
    out.push(b'}');
    Bytes::from(out)
}

/// `POST …/ack`, `…/nack`, `…/extend` and `…/terminate`, by their body `R`: one result per
/// receipt, in the order sent.
pub async fn settle<R: SettleBody>(
    State(state): State<AppState>,
    path: GroupPath,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    raw: Body,
) -> ApiResult<Json<SettleResponse>> {
    let c = call(&state, path, query, &headers)?;
    let r: R = body(&state, &headers, raw, R::SHAPE).await?;
    let (receipts, how) = r.settle()?;
    let results = c
        .groups
        .settle(&c.stream, &c.group, &receipts, &how)
        .await?;
    Ok(Json(SettleResponse {
        results: receipts
            .into_iter()
            .zip(results)
            .map(|(receipt, result)| ReceiptOutcome { receipt, result })
            .collect(),
    }))
}

/// The body of a settle call: its receipts and what to do with them.
pub trait SettleBody: DeserializeOwned {
    /// The body's fields, for the error a malformed body gets.
    const SHAPE: &'static str;
    fn settle(self) -> ApiResult<(Vec<String>, Settle)>;
}

impl SettleBody for AckRequest {
    const SHAPE: &'static str = "{\"receipts\":[…]}";
    fn settle(self) -> ApiResult<(Vec<String>, Settle)> {
        Ok((self.receipts, Settle::Ack))
    }
}

impl SettleBody for NackRequest {
    const SHAPE: &'static str = "{\"receipts\":[…],\"delay\",\"reason\"}";
    fn settle(self) -> ApiResult<(Vec<String>, Settle)> {
        let how = Settle::Nack {
            delay: self.delay.map_or(Duration::ZERO, |d| d.0),
            reason: Groups::reason(self.reason.as_deref())?,
        };
        Ok((self.receipts, how))
    }
}

impl SettleBody for ExtendRequest {
    const SHAPE: &'static str = "{\"receipts\":[…],\"visibility_timeout\"}";
    fn settle(self) -> ApiResult<(Vec<String>, Settle)> {
        let how = Settle::Extend {
            visibility_timeout: self.visibility_timeout.map(|d| d.0),
        };
        Ok((self.receipts, how))
    }
}

impl SettleBody for TerminateRequest {
    const SHAPE: &'static str = "{\"receipts\":[…],\"reason\"}";
    fn settle(self) -> ApiResult<(Vec<String>, Settle)> {
        let how = Settle::Terminate {
            reason: Groups::reason(self.reason.as_deref())?,
        };
        Ok((self.receipts, how))
    }
}

/// `POST …/redrive`: needs `publish` on the stream too.
pub async fn redrive(
    State(state): State<AppState>,
    path: GroupPath,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> ApiResult<Json<RedriveResponse>> {
    let c = call(&state, path, query, &headers)?;
    c.principal.check(Action::Publish, &c.stream)?;
    let done = c.groups.redrive(&c.stream, &c.group).await?;
    Ok(Json(RedriveResponse {
        dead_letter: done.dead_letter.map(|s| s.to_string()).unwrap_or_default(),
        moved: done.moved,
        skipped: done.skipped,
        more: done.more,
    }))
}

fn info(stream: &StreamName, group: &GroupName, view: GroupView) -> GroupInfo {
    GroupInfo {
        stream: stream.to_string(),
        group: group.to_string(),
        config: view.config.to_spec(),
        dead_letter: view.dead_letter.to_string(),
        created: view.created_ms,
        stats: stats_body(view.stats),
    }
}

fn stats_body(s: GroupStats) -> GroupStatsBody {
    GroupStatsBody {
        pending: s.pending,
        in_flight: s.in_flight,
        oldest_age_ms: s.oldest_age_ms,
        acked: s.acked,
        redelivered: s.redelivered,
        dead_lettered: s.dead_lettered,
        expired: s.expired,
        resets: s.resets,
        cursor: s.cursor.to_string(),
        last_reset: s.last_reset.as_ref().map(GroupResetBody::from),
        members: s
            .members
            .into_iter()
            .map(|m| MemberStatsBody {
                consumer: m.consumer.to_string(),
                last_seen: m.last_seen_ms,
                in_flight: m.in_flight,
                nacks: m.nacks,
                timeouts: m.timeouts,
            })
            .collect(),
    }
}
