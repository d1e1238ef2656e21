//! Connections in and out: TLS when installed, plaintext otherwise, with the
//! peer's identity read once at the handshake.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::Tls;

/// How long a peer has to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Who is at the other end of a connection a server accepted; every request
/// on it carries this (tonic's connect info, in the request's extensions).
#[derive(Debug, Clone, Default)]
pub struct Peer {
    pub remote: Option<SocketAddr>,
    /// The first DNS name of the peer's certificate; `None` over plaintext
    /// or for a certificate without one.
    pub identity: Option<Arc<str>>,
    /// Whether the connection is TLS.
    pub tls: bool,
}

/// A connection a server accepted.
pub struct Conn {
    io: Io,
    peer: Peer,
}

enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// The connections a server accepts on `listener`, `TCP_NODELAY` set on each
/// (small RPC replies must not wait for Nagle's algorithm): TLS handshakes,
/// each in a task of its own so that a slow peer holds up no other, when TLS
/// is [`crate::install`]ed; plaintext otherwise. Accepting stops, and the
/// listener closes, when the server drops the stream.
pub fn incoming(listener: TcpListener) -> impl tokio_stream::Stream<Item = io::Result<Conn>> {
    let tls = crate::installed().cloned();
    let (accepted, stream) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                () = accepted.closed() => return,
                next = listener.accept() => next,
            };
            let (tcp, remote) = match next {
                Ok(next) => next,
                Err(err) => {
                    // Out of file descriptors and the like: tonic logs it and goes on.
                    if accepted.send(Err(err)).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            // Best effort: a socket that refuses still works, just slower.
            let _ = tcp.set_nodelay(true);
            let Some(tls) = &tls else {
                let peer = Peer { remote: Some(remote), identity: None, tls: false };
                if accepted.send(Ok(Conn { io: Io::Plain(tcp), peer })).await.is_err() {
                    return;
                }
                continue;
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config());
            let accepted = accepted.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let identity = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|certs| certs.first())
                            .and_then(|cert| crate::identity_of(cert))
                            .map(Arc::from);
                        let peer = Peer { remote: Some(remote), identity, tls: true };
                        let _ = accepted.send(Ok(Conn { io: Io::Tls(Box::new(stream)), peer })).await;
                    }
                    Ok(Err(err)) => refused(remote, &err.to_string()),
                    Err(_) => refused(remote, "the handshake took longer than 10 s"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(stream)
}

fn refused(remote: SocketAddr, why: &str) {
    metrics::counter!(crate::HANDSHAKES_REFUSED).increment(1);
    tracing::warn!(%remote, "TLS handshake refused: {why}");
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

macro_rules! each_io {
    ($self:ident, $io:ident => $body:expr) => {
        match &mut $self.get_mut().io {
            Io::Plain($io) => {
                let $io = Pin::new($io);
                $body
            }
            Io::Tls($io) => {
                let $io = Pin::new(&mut **$io);
                $body
            }
        }
    };
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        each_io!(self, io => io.poll_read(cx, buf))
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        each_io!(self, io => io.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        each_io!(self, io => io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(io) => io.is_write_vectored(),
            Io::Tls(io) => io.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each_io!(self, io => io.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each_io!(self, io => io.poll_shutdown(cx))
    }
}

/// A channel to `endpoint`, connected when first used: over mutual TLS with
/// the installed material (whatever it is at each connection: a reload
/// applies to the next one), plaintext when none is installed. The server's
/// certificate must name the URL's host (a DNS name or an IP address).
pub fn channel(endpoint: Endpoint) -> Channel {
    match crate::installed() {
        Some(tls) => endpoint.connect_with_connector_lazy(Connector(tls.clone())),
        None => endpoint.connect_lazy(),
    }
}

/// [`channel`], connected now.
pub async fn connect(endpoint: Endpoint) -> Result<Channel, tonic::transport::Error> {
    match crate::installed() {
        Some(tls) => endpoint.connect_with_connector(Connector(tls.clone())).await,
        None => endpoint.connect().await,
    }
}

/// Opens TCP connections and does the client's side of the handshake.
#[derive(Clone)]
struct Connector(Arc<Tls>);

type ClientStream = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;

impl tower::Service<Uri> for Connector {
    type Response = ClientStream;
    type Error = io::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = io::Result<ClientStream>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let config = self.0.client_config();
        Box::pin(async move {
            let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidInput, what);
            let host = uri.host().ok_or_else(|| invalid(format!("{uri}: no host")))?;
            let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
            let port = uri.port_u16().unwrap_or(443);
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            let _ = tcp.set_nodelay(true);
            let name = rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|e| invalid(format!("{host}: not a host name for TLS: {e}")))?;
            let stream = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await?;
            Ok(hyper_util::rt::TokioIo::new(stream))
        })
    }
}
