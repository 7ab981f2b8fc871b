//! Following a stream with Spool's own client and checking every event on the way.

use std::time::Duration;

use spool_client::{Client, Config, Event, Start};

/// Starts `count` subscribers of `stream` from its oldest message with Spool's client at
/// `url` (API key, quick reconnects), each followed by a task checking every message up to
/// offset `total` until `deadline`; the tasks' results are what each saw.
pub async fn subscribers(
    url: &str,
    stream: &str,
    count: usize,
    total: u64,
    deadline: tokio::time::Instant,
) -> Vec<tokio::task::JoinHandle<Seen>> {
    let mut readers = Vec::new();
    for _ in 0..count {
        let config = Config::new(url)
            .token(super::API_KEY)
            .backoff(Duration::from_millis(10), Duration::from_millis(250))
            .connect_timeout(Duration::from_secs(5));
        let client = Client::connect(config).await.expect("connect");
        client
            .subscribe(stream, Start::Oldest)
            .await
            .expect("subscribe");
        readers.push(tokio::spawn(follow(client, total, deadline)));
    }
    readers
}

/// What one subscriber saw.
#[derive(Debug, Default)]
pub struct Seen {
    pub last: u64,
    pub connects: u64,
    pub resumed: u64,
    pub disconnects: u64,
    pub problems: Vec<String>,
}

/// Waits for every subscriber of [`subscribers`]; returns what they saw in total (connects,
/// resumes, disconnects) and a line for each that did not see every message up to offset
/// `total` in order, or saw a problem.
pub async fn gather(
    readers: Vec<tokio::task::JoinHandle<Seen>>,
    total: u64,
) -> (Seen, Vec<String>) {
    let mut totals = Seen::default();
    let mut failures = Vec::new();
    for (i, reader) in readers.into_iter().enumerate() {
        let seen = reader.await.expect("subscriber task");
        if seen.last != total || !seen.problems.is_empty() {
            failures.push(format!(
                "subscriber {i}: last offset {}, {:?}",
                seen.last, seen.problems
            ));
        }
        totals.connects += seen.connects;
        totals.resumed += seen.resumed;
        totals.disconnects += seen.disconnects;
    }
    (totals, failures)
}

/// Reads the client's events until offset `total` arrived (or `deadline` passed), checking
/// each message on the way: the next offset in turn, with its own payload.
pub async fn follow(client: Client, total: u64, deadline: tokio::time::Instant) -> Seen {
    let mut seen = Seen::default();
    while seen.last < total {
        let Ok(event) = tokio::time::timeout_at(deadline, client.next_event()).await else {
            seen.problems
                .push(format!("timed out at offset {}", seen.last));
            break;
        };
        match event {
            Some(Event::Message(m)) => {
                let offset = m.position.offset.get();
                if offset != seen.last + 1 || m.text() != Some(offset.to_string().as_str()) {
                    seen.problems.push(format!(
                        "after offset {} got offset {offset} ({:?})",
                        seen.last,
                        m.text()
                    ));
                    break;
                }
                seen.last = offset;
            }
            Some(Event::Connected { resumed, .. }) => {
                seen.connects += 1;
                seen.resumed += u64::from(resumed);
            }
            Some(Event::Disconnected { .. }) => seen.disconnects += 1,
            Some(Event::Subscribed(_)) => {}
            Some(other @ (Event::Reset { .. } | Event::Skipped { .. })) => {
                seen.problems.push(format!("{other:?}"));
                break;
            }
            Some(other) => {
                seen.problems.push(format!("{other:?}"));
                if matches!(other, Event::Error { terminal: true, .. }) {
                    break;
                }
            }
            None => {
                seen.problems.push("the client ended".into());
                break;
            }
        }
    }
    client.close().await;
    seen
}
