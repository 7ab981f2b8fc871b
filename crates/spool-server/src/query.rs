//! Query-string parsing that answers bad input with our JSON errors (axum's own extractors
//! answer in plain text), and the `after` forms shared by long-poll and SSE.

use std::time::Duration;

use spool_core::Start;

use crate::error::{ApiError, ApiResult};

/// The query string as ordered pairs, so repeated keys (`stream=a&stream=b`) keep their order.
#[derive(Debug, Default)]
pub struct QueryParams(Vec<(String, String)>);

impl QueryParams {
    pub fn parse(raw: Option<&str>) -> ApiResult<Self> {
        match raw {
            None => Ok(Self::default()),
            Some(q) => serde_urlencoded::from_str(q)
                .map(Self)
                .map_err(|e| ApiError::bad_param(format!("malformed query string: {e}"))),
        }
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn get_all<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .iter()
            .filter(move |(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// A whole number in `1..=max`, or `default` when absent.
    pub fn limit(&self, default: usize, max: usize) -> ApiResult<usize> {
        match self.get("limit") {
            None => Ok(default.min(max)),
            Some(v) => match v.parse::<usize>() {
                Ok(n) if n >= 1 => Ok(n.min(max)),
                _ => Err(ApiError::bad_param(format!(
                    "limit must be a whole number from 1 to {max}, got {v:?}"
                ))),
            },
        }
    }

    /// Seconds to wait, `0..=max`, fractions allowed; 0 when absent.
    pub fn wait(&self, max: Duration) -> ApiResult<Duration> {
        match self.get("wait") {
            None => Ok(Duration::ZERO),
            Some(v) => match v.parse::<f64>() {
                // A wait longer than the server allows is shortened to it; a number no
                // duration can hold (past ~1.8e19 s) is as wrong as a negative one.
                Ok(s) if s >= 0.0 && Duration::try_from_secs_f64(s).is_ok() => {
                    Ok(Duration::from_secs_f64(s).min(max))
                }
                _ => Err(ApiError::bad_param(format!(
                    "wait must be a number of seconds from 0 to {}, got {v:?}",
                    max.as_secs()
                ))),
            },
        }
    }
}

/// Parses one start: `EPOCH:OFFSET`, `oldest`, `latest` or `now`.
pub fn parse_start(what: &str, s: &str) -> ApiResult<Start> {
    s.parse::<Start>()
        .map_err(|e| ApiError::invalid_position(what, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_keys_keep_order() {
        let q = QueryParams::parse(Some("stream=a&stream=b%2Fc&limit=5")).unwrap();
        assert_eq!(q.get_all("stream").collect::<Vec<_>>(), ["a", "b/c"]);
        assert_eq!(q.limit(100, 1000).unwrap(), 5);
    }

    #[test]
    fn bad_numbers_are_errors() {
        let q = QueryParams::parse(Some("limit=0&wait=-1")).unwrap();
        assert!(q.limit(100, 1000).is_err());
        assert!(q.wait(Duration::from_secs(60)).is_err());
        let q = QueryParams::parse(Some("wait=1e9")).unwrap();
        assert_eq!(
            q.wait(Duration::from_secs(60)).unwrap(),
            Duration::from_secs(60)
        );
        for bad in ["1.9e19", "1e308", "inf", "NaN", "-0.5", "1e400x"] {
            let q = QueryParams::parse(Some(&format!("wait={bad}"))).unwrap();
            assert!(q.wait(Duration::from_secs(60)).is_err(), "{bad}");
        }
        let q = QueryParams::parse(Some("limit=99999&wait=600")).unwrap();
        assert_eq!(q.limit(100, 1000).unwrap(), 1000);
        assert_eq!(
            q.wait(Duration::from_secs(60)).unwrap(),
            Duration::from_secs(60)
        );
    }

    #[test]
    fn starts() {
        assert_eq!(parse_start("after", "oldest").unwrap(), Start::Oldest);
        assert_eq!(parse_start("after", "now").unwrap(), Start::Now);
        assert!(matches!(
            parse_start("after", "e:3").unwrap(),
            Start::After(_)
        ));
        assert!(parse_start("after", "garbage").is_err());
    }
}
