//! Following a coordinator group's leader.
//!
//! [`Coordinators`] is a gRPC channel over the URLs of a coordinator group
//! (or of the one coordinator): every request goes to the replica it
//! believes leads. When a replica answers `REASON_NOT_LEADER` (it did
//! nothing) with the leader's URL, the next request goes there; when a
//! replica cannot be reached, the next request tries the next URL. The
//! request that met the refusal fails with it: the callers that may send it
//! again (everything refused before it started, every read) do, and
//! [`is_not_leader`] tells them when.
//!
//! The SDK's [`crate::Client`], the CLI and the participant library reach
//! the coordinator through it; a single coordinator is a list of one.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::codegen::http;
use tonic::transport::Channel;

use crate::ClientError;

/// A channel to whichever of a group's coordinators leads (see the module).
#[derive(Clone)]
pub struct Coordinators {
    inner: Arc<Inner>,
}

struct Inner {
    /// Every URL heard of, with its channel: the configured ones first.
    known: Mutex<Vec<(String, Channel)>>,
    /// Which of `known` requests go to.
    current: AtomicUsize,
}

impl std::fmt::Debug for Coordinators {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinators").field("urls", &self.urls()).field("current", &self.current()).finish()
    }
}

use crate::channel as connect;

impl Coordinators {
    /// The coordinators at `list`: URLs separated by commas
    /// (`http://10.0.0.1:7000,http://10.0.0.2:7000`), or one.
    pub fn new(list: &str) -> Result<Coordinators, ClientError> {
        let urls: Vec<&str> = list.split(',').map(str::trim).filter(|u| !u.is_empty()).collect();
        if urls.is_empty() {
            return Err(ClientError::Url { url: list.into(), why: "no coordinator URL".into() });
        }
        let mut known = Vec::with_capacity(urls.len());
        for url in urls {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(ClientError::Url { url: url.into(), why: "expected http://HOST:PORT".into() });
            }
            if !known.iter().any(|(k, _): &(String, Channel)| k == url) {
                known.push((url.to_owned(), connect(url)?));
            }
        }
        Ok(Coordinators { inner: Arc::new(Inner { known: Mutex::new(known), current: AtomicUsize::new(0) }) })
    }

    /// Every URL known, the configured ones first.
    pub fn urls(&self) -> Vec<String> {
        self.inner.known().iter().map(|(url, _)| url.clone()).collect()
    }

    /// How many URLs were given or heard of: more than one is a group.
    pub fn len(&self) -> usize {
        self.inner.known().len()
    }

    /// Never: there is always one URL at least.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The URL requests go to now.
    pub fn current(&self) -> String {
        let known = self.inner.known();
        known[self.inner.current.load(Ordering::Relaxed) % known.len()].0.clone()
    }
}

impl Inner {
    fn known(&self) -> std::sync::MutexGuard<'_, Vec<(String, Channel)>> {
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn pick(&self) -> (usize, Channel) {
        let known = self.known();
        let index = self.current.load(Ordering::Relaxed) % known.len();
        (index, known[index].1.clone())
    }

    /// The request sent to `from` was refused for not leading (with the
    /// leader's URL when `hint` has it) or did not reach it: move on,
    /// unless another request moved already.
    fn moved(&self, from: usize, hint: Option<String>) {
        let mut known = self.known();
        let to = match hint {
            Some(url) => match known.iter().position(|(k, _)| *k == url) {
                Some(index) => index,
                None => match connect(&url) {
                    Ok(channel) => {
                        known.push((url, channel));
                        known.len() - 1
                    }
                    Err(_) => (from + 1) % known.len(),
                },
            },
            None => (from + 1) % known.len(),
        };
        let _ = self.current.compare_exchange(from, to, Ordering::Relaxed, Ordering::Relaxed);
    }
}

/// Whether a response's headers are a follower's refusal, and the leader's
/// URL it names: `Some(hint)` for a refusal.
fn refusal(headers: &http::HeaderMap) -> Option<Option<String>> {
    let status = headers.get("grpc-status")?.to_str().ok()?;
    if status != (tonic::Code::Unavailable as i32).to_string() {
        return None;
    }
    let reason = headers.get(decree_proto::REASON_METADATA)?.to_str().ok()?;
    if reason != decree_proto::Reason::NotLeader.to_wire().to_string() {
        return None;
    }
    let hint = headers.get(decree_proto::LEADER_METADATA).and_then(|v| v.to_str().ok()).map(str::to_owned);
    Some(hint)
}

/// Moves on from replica `index` when dropped armed.
struct Unanswered {
    inner: Option<Arc<Inner>>,
    index: usize,
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take() {
            inner.moved(self.index, None);
        }
    }
}

/// True when `status` is a follower's refusal: nothing was done, and the
/// request may be sent again (it goes to the leader next).
pub fn is_not_leader(status: &tonic::Status) -> bool {
    decree_proto::Reason::of_status(status) == decree_proto::Reason::NotLeader
}

impl tonic::codegen::Service<http::Request<Body>> for Coordinators {
    type Response = http::Response<Body>;
    type Error = tonic::transport::Error;
    type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Each call readies the channel it picks.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let inner = self.inner.clone();
        let (index, mut channel) = inner.pick();
        Box::pin(async move {
            // Given up on before an answer came (a replica that does not
            // answer at all): the next request tries the next one.
            let mut unanswered = Unanswered { inner: Some(inner.clone()), index };
            std::future::poll_fn(|cx| tonic::codegen::Service::poll_ready(&mut channel, cx)).await?;
            let answer = tonic::codegen::Service::call(&mut channel, request).await;
            unanswered.inner = None;
            match &answer {
                Ok(response) => {
                    if let Some(hint) = refusal(response.headers()) {
                        inner.moved(index, hint);
                    }
                }
                Err(_) => inner.moved(index, None),
            }
            answer
        })
    }
}
