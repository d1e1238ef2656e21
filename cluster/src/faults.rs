//! A fault proxy: a TCP relay between two processes that a test controls, for
//! network faults without root or a firewall.
//!
//! A [`FaultProxy`] listens on a port of its own and relays every connection
//! to its upstream. [`FaultProxy::set`] changes what happens to the bytes from
//! then on:
//!
//! - [`Fault::Pass`]: relayed (the healed state);
//! - [`Fault::Cut`]: every connection is reset and new ones are refused (a
//!   process gone, a port closed);
//! - [`Fault::Blackhole`]: connections are accepted and held, nothing passes
//!   either way (a partition: the peer times out);
//! - [`Fault::Delay`]: each chunk is relayed that much later, in order;
//!   [`Fault::DelayAnswers`] / [`Fault::DelayRequests`] only one way (a vote,
//!   or a Commit, still in flight while a test changes the fault);
//! - [`Fault::DropAnswers`] / [`Fault::DropRequests`]: one way lost: with
//!   answers dropped, requests still arrive and are acted on, and nothing
//!   comes back.
//!
//! Lost bytes are never followed by later ones on the same connection (TCP
//! does not lose bytes in the middle of a stream; a real link that drops them
//! ends with the connection reset): once a direction drops anything, it drops
//! everything after, and when the fault is lifted such connections are reset,
//! so the peers reconnect on a clean stream. Requests flow from the side that
//! connected to the upstream; answers flow back.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

/// What a [`FaultProxy`] does to the bytes it relays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Pass,
    Cut,
    Blackhole,
    Delay(Duration),
    DelayAnswers(Duration),
    DelayRequests(Duration),
    DropAnswers,
    DropRequests,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Way {
    Requests,
    Answers,
}

/// What happens to one chunk going `way` under `fault`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Relay(Duration),
    Drop,
}

impl Fault {
    fn fate(self, way: Way) -> Fate {
        match (self, way) {
            (Fault::Pass, _) => Fate::Relay(Duration::ZERO),
            (Fault::Delay(d), _) | (Fault::DelayAnswers(d), Way::Answers) => Fate::Relay(d),
            (Fault::DelayRequests(d), Way::Requests) => Fate::Relay(d),
            (Fault::DelayAnswers(_), Way::Requests) | (Fault::DelayRequests(_), Way::Answers) => {
                Fate::Relay(Duration::ZERO)
            }
            (Fault::Cut | Fault::Blackhole, _) => Fate::Drop,
            (Fault::DropAnswers, Way::Requests) | (Fault::DropRequests, Way::Answers) => {
                Fate::Relay(Duration::ZERO)
            }
            (Fault::DropAnswers, Way::Answers) | (Fault::DropRequests, Way::Requests) => Fate::Drop,
        }
    }
}

/// A relay on `127.0.0.1` to one upstream address; dropped, it stops and
/// resets every connection it relays.
pub struct FaultProxy {
    address: SocketAddr,
    fault: Arc<watch::Sender<Fault>>,
    answers: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on an ephemeral port of 127.0.0.1, relaying to `upstream`
    /// (which need not listen yet: a connection finds it down and is reset).
    /// Must run inside a tokio runtime.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<FaultProxy> {
        FaultProxy::on(TcpListener::bind("127.0.0.1:0").await?, upstream)
    }

    /// Relays what `listener` accepts to `upstream` (a port bound before the
    /// upstream's was chosen, so the two can never be the same).
    pub fn on(listener: TcpListener, upstream: SocketAddr) -> std::io::Result<FaultProxy> {
        let address = listener.local_addr()?;
        let fault = Arc::new(watch::Sender::new(Fault::Pass));
        let answers = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(accept(listener, upstream, fault.clone(), answers.clone()));
        Ok(FaultProxy { address, fault, answers, task })
    }

    /// Where to connect to be relayed.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// `http://` and [`FaultProxy::address`].
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// From now on, `fault` (connections that lost bytes are reset when it
    /// no longer drops them).
    pub fn set(&self, fault: Fault) {
        self.fault.send_replace(fault);
    }

    /// [`Fault::Pass`].
    pub fn heal(&self) {
        self.set(Fault::Pass);
    }

    pub fn fault(&self) -> Fault {
        *self.fault.borrow()
    }

    /// Bytes of answers taken in to be relayed so far (a chunk counts once
    /// read, so it is on its way whatever the fault is set to next): a test
    /// waits for this to grow before it drops what follows an answer.
    pub fn answers_relayed(&self) -> u64 {
        self.answers.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // Connections watch the sender: closing it ends them too.
        self.task.abort();
        self.fault.send_replace(Fault::Cut);
    }
}

async fn accept(
    listener: TcpListener,
    upstream: SocketAddr,
    fault: Arc<watch::Sender<Fault>>,
    answers: Arc<AtomicU64>,
) {
    loop {
        let Ok((inbound, _)) = listener.accept().await else { continue };
        if *fault.borrow() == Fault::Cut {
            reset(inbound);
            continue;
        }
        tokio::spawn(relay(inbound, upstream, fault.subscribe(), answers.clone()));
    }
}

/// Closes `stream` with a reset rather than an orderly end.
fn reset(stream: TcpStream) {
    // Deprecated because a lingering close blocks the thread; a zero linger never does.
    #[allow(deprecated)]
    let _ = stream.set_linger(Some(Duration::ZERO));
    drop(stream);
}

async fn relay(
    mut inbound: TcpStream,
    upstream: SocketAddr,
    mut fault: watch::Receiver<Fault>,
    answers: Arc<AtomicU64>,
) {
    let Ok(mut outbound) = TcpStream::connect(upstream).await else {
        reset(inbound);
        return;
    };
    let _ = (inbound.set_nodelay(true), outbound.set_nodelay(true));
    let (damaged, mut damage) = watch::channel(false);
    let (from_client, to_client) = inbound.split();
    let (from_upstream, to_upstream) = outbound.split();
    let requests = pump(from_client, to_upstream, fault.clone(), (Way::Requests, None), &damaged);
    let answers = pump(from_upstream, to_client, fault.clone(), (Way::Answers, Some(&*answers)), &damaged);
    let watch = async {
        loop {
            let now = *fault.borrow_and_update();
            let lost = *damage.borrow_and_update();
            // Cut: reset now. Lost bytes and a fault that no longer drops: reset, so the peers start clean.
            let drops =
                matches!(now, Fault::Cut | Fault::Blackhole | Fault::DropAnswers | Fault::DropRequests);
            if now == Fault::Cut || (lost && !drops) {
                return;
            }
            tokio::select! {
                changed = fault.changed() => if changed.is_err() { return },
                _ = damage.changed() => {}
            }
        }
    };
    let broken = tokio::select! {
        _ = async { tokio::join!(requests, answers) } => false,
        () = watch => true,
    };
    if broken {
        reset(inbound);
        reset(outbound);
    }
}

/// Relays `from` to `to` under the current fault, in order, each chunk at its
/// time; once a chunk is dropped, every later one is too (`damaged` says so).
async fn pump(
    mut from: impl tokio::io::AsyncRead + Unpin,
    mut to: impl tokio::io::AsyncWrite + Unpin,
    fault: watch::Receiver<Fault>,
    (way, counted): (Way, Option<&AtomicU64>),
    damaged: &watch::Sender<bool>,
) {
    let (queue, mut queued) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = async move {
        while let Some((at, chunk)) = queued.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    let reader = async move {
        let mut lost = false;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let fate = fault.borrow().fate(way);
            match fate {
                Fate::Relay(delay) if !lost => {
                    if let Some(counted) = counted {
                        counted.fetch_add(n as u64, Ordering::SeqCst);
                    }
                    if queue.send((Instant::now() + delay, buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
                _ => {
                    lost = true;
                    damaged.send_replace(true);
                }
            }
        }
        // Dropping `queue` lets the writer finish what is queued and end its half.
    };
    tokio::join!(reader, writer);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server: answers every byte it reads.
    async fn echo() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        address
    }

    /// Sends `what` and reads an answer of its length within `within`, or None.
    async fn round_trip(s: &mut TcpStream, what: &[u8], within: Duration) -> Option<Vec<u8>> {
        s.write_all(what).await.ok()?;
        let mut got = vec![0u8; what.len()];
        match tokio::time::timeout(within, s.read_exact(&mut got)).await {
            Ok(Ok(_)) => Some(got),
            _ => None,
        }
    }

    #[tokio::test]
    async fn relays_drops_one_way_resets_on_heal_and_cuts() {
        let proxy = FaultProxy::start(echo().await).await.unwrap();
        let mut s = TcpStream::connect(proxy.address()).await.unwrap();
        assert_eq!(round_trip(&mut s, b"ping", Duration::from_secs(5)).await.as_deref(), Some(&b"ping"[..]));

        proxy.set(Fault::DropAnswers);
        assert_eq!(round_trip(&mut s, b"lost", Duration::from_millis(200)).await, None);
        proxy.heal();
        // The damaged connection is reset, not resumed mid-stream.
        let mut buf = [0u8; 8];
        let end = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.unwrap();
        assert!(matches!(end, Ok(0) | Err(_)), "{end:?}");
        let mut s = TcpStream::connect(proxy.address()).await.unwrap();
        assert_eq!(round_trip(&mut s, b"back", Duration::from_secs(5)).await.as_deref(), Some(&b"back"[..]));

        proxy.set(Fault::Cut);
        let mut buf = [0u8; 8];
        let end = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.unwrap();
        assert!(matches!(end, Ok(0) | Err(_)), "cut resets open connections: {end:?}");
        if let Ok(mut again) = TcpStream::connect(proxy.address()).await {
            assert_eq!(round_trip(&mut again, b"x", Duration::from_millis(500)).await, None, "refused");
        }
        proxy.heal();
        let mut s = TcpStream::connect(proxy.address()).await.unwrap();
        assert!(round_trip(&mut s, b"ok", Duration::from_secs(5)).await.is_some());
    }

    #[tokio::test]
    async fn a_delay_holds_every_chunk_and_keeps_their_order() {
        let proxy = FaultProxy::start(echo().await).await.unwrap();
        let mut s = TcpStream::connect(proxy.address()).await.unwrap();
        proxy.set(Fault::Delay(Duration::from_millis(150)));
        let started = Instant::now();
        s.write_all(b"ab").await.unwrap();
        s.write_all(b"cd").await.unwrap();
        let mut got = [0u8; 4];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"abcd");
        // Each way is delayed: at least twice the delay for the round trip.
        assert!(started.elapsed() >= Duration::from_millis(300), "{:?}", started.elapsed());
        proxy.set(Fault::Blackhole);
        assert_eq!(round_trip(&mut s, b"gone", Duration::from_millis(200)).await, None);
    }
}
