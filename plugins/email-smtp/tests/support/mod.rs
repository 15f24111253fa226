//! A real SMTP server on loopback for the tests: the `mailin` crate's SMTP parser and
//! state machine (EHLO, STARTTLS, AUTH, MAIL, RCPT, DATA, QUIT) behind std sockets,
//! one thread per connection, with rustls for STARTTLS and implicit TLS (the test
//! certificates in `tests/certs`), scripted refusals, and a record of every message
//! it accepted, exactly as it arrived.

#![allow(dead_code, reason = "each test binary uses a part of it")]

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use mailin::response::{AUTH_OK, INVALID_CREDENTIALS, OK};
use mailin::{Action, AuthMechanism, Handler, Response, SessionBuilder};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ServerConfig, ServerConnection, StreamOwned};

/// How clients reach the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Security {
    /// Plain text; no STARTTLS offered.
    Plain,
    /// Plain text, STARTTLS offered.
    StartTls,
    /// TLS from the first byte.
    Tls,
}

/// What the server answers instead of 250, and what it demands.
#[derive(Clone, Debug, Default)]
pub struct Script {
    /// The reply to every RCPT TO.
    pub rcpt: Option<(u16, &'static str)>,
    /// The reply after the message data.
    pub data_end: Option<(u16, &'static str)>,
    /// Required credentials (user, password); AUTH PLAIN and LOGIN are offered.
    pub credentials: Option<(&'static str, &'static str)>,
}

/// A message the server accepted.
#[derive(Clone, Debug, Default)]
pub struct Received {
    /// The EHLO name.
    pub helo: String,
    /// MAIL FROM.
    pub from: String,
    /// Every RCPT TO.
    pub to: Vec<String>,
    /// The message, dot-unstuffed, CRLF line ends.
    pub data: Vec<u8>,
    /// Whether the session was encrypted.
    pub tls: bool,
    /// The user the session authenticated as.
    pub user: Option<String>,
}

impl Received {
    /// The message as text.
    pub fn text(&self) -> String {
        String::from_utf8(self.data.clone()).expect("the message is UTF-8")
    }

    /// The value of header `name` (case-insensitive, unfolded).
    pub fn header(&self, name: &str) -> Option<String> {
        let text = self.text();
        let head = text.split("\r\n\r\n").next().unwrap_or_default();
        let mut found: Option<String> = None;
        for line in head.split("\r\n") {
            if line.starts_with([' ', '\t']) {
                if let Some(value) = found.as_mut() {
                    value.push_str(line.trim_start());
                    continue;
                }
            } else if found.is_some() {
                break;
            }
            if let Some((n, v)) = line.split_once(':')
                && n.eq_ignore_ascii_case(name)
            {
                found = Some(v.trim().to_owned());
            }
        }
        found
    }

    /// The message body (after the blank line).
    pub fn body(&self) -> String {
        let text = self.text();
        text.split_once("\r\n\r\n")
            .map(|(_, body)| body.to_owned())
            .unwrap_or_default()
    }
}

/// A running server; stops (and joins its accept thread) when dropped.
pub struct SmtpServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Messages accepted so far.
    received: Arc<Mutex<Vec<Received>>>,
    /// Tells the accept loop to end.
    stop: Arc<AtomicBool>,
    /// The accept loop.
    accept: Option<JoinHandle<()>>,
}

/// The folder of the test certificates.
pub fn certs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/certs")
}

fn tls_config() -> Arc<ServerConfig> {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(certs().join("localhost.pem"))
            .expect("certificate file")
            .collect::<Result<_, _>>()
            .expect("certificates");
    let key = PrivateKeyDer::from_pem_file(certs().join("localhost.key")).expect("key");
    let config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("server certificate");
    Arc::new(config)
}

impl SmtpServer {
    /// Binds `127.0.0.1:0` and serves until dropped.
    pub fn start(security: Security, script: Script) -> SmtpServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("address");
        let received = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let tls = (security != Security::Plain).then(tls_config);
        let (sink, stopping) = (received.clone(), stop.clone());
        let accept = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let (tls, script, sink) = (tls.clone(), script.clone(), sink.clone());
                std::thread::spawn(move || {
                    // A client that hangs up mid-session is not the server's failure.
                    let _ = serve(stream, security, tls, script, sink);
                });
            }
        });
        SmtpServer {
            addr,
            received,
            stop,
            accept: Some(accept),
        }
    }

    /// Every message accepted so far.
    pub fn received(&self) -> Vec<Received> {
        self.received
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }
}

/// The session's handler: records what the client sends, answers as scripted.
struct Recorder {
    script: Script,
    current: Received,
    tls: Arc<AtomicBool>,
    sink: Arc<Mutex<Vec<Received>>>,
}

impl Recorder {
    fn scripted(reply: Option<(u16, &'static str)>) -> Option<Response> {
        reply.map(|(code, text)| Response::custom(code, text.to_owned()))
    }

    fn login(&mut self, user: &str, password: &str) -> Response {
        match self.script.credentials {
            Some((u, p)) if u == user && p == password => {
                self.current.user = Some(user.to_owned());
                AUTH_OK
            }
            _ => INVALID_CREDENTIALS,
        }
    }
}

impl Handler for Recorder {
    fn helo(&mut self, _ip: IpAddr, domain: &str) -> Response {
        self.current.helo = domain.to_owned();
        OK
    }

    fn mail(&mut self, _ip: IpAddr, _domain: &str, from: &str) -> Response {
        self.current.from = from.to_owned();
        self.current.to.clear();
        self.current.data.clear();
        OK
    }

    fn rcpt(&mut self, to: &str) -> Response {
        if let Some(reply) = Self::scripted(self.script.rcpt) {
            return reply;
        }
        self.current.to.push(to.to_owned());
        OK
    }

    fn data(&mut self, buf: &[u8]) -> io::Result<()> {
        self.current.data.extend_from_slice(buf);
        Ok(())
    }

    fn data_end(&mut self) -> Response {
        if let Some(reply) = Self::scripted(self.script.data_end) {
            return reply;
        }
        let mut message = self.current.clone();
        message.tls = self.tls.load(Ordering::SeqCst);
        self.sink
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(message);
        self.current.data.clear();
        OK
    }

    fn auth_plain(&mut self, _authorization: &str, user: &str, password: &str) -> Response {
        self.login(user, password)
    }

    fn auth_login(&mut self, user: &str, password: &str) -> Response {
        self.login(user, password)
    }
}

/// The connection, before and after TLS.
enum Connection {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ServerConnection, TcpStream>>),
}

impl Connection {
    fn upgrade(self, config: &Arc<ServerConfig>) -> io::Result<Connection> {
        match self {
            Connection::Plain(stream) => {
                let session = ServerConnection::new(config.clone()).map_err(io::Error::other)?;
                Ok(Connection::Tls(Box::new(StreamOwned::new(session, stream))))
            }
            tls => Ok(tls),
        }
    }

    /// One line, with its CRLF; `None` at the end of the stream.
    fn read_line(&mut self) -> io::Result<Option<Vec<u8>>> {
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        loop {
            let n = match self {
                Connection::Plain(s) => s.read(&mut byte)?,
                Connection::Tls(s) => s.read(&mut byte)?,
            };
            if n == 0 {
                return Ok((!line.is_empty()).then_some(line));
            }
            line.push(byte[0]);
            if byte[0] == b'\n' {
                return Ok(Some(line));
            }
        }
    }

    fn reply(&mut self, response: &Response) -> io::Result<()> {
        let bytes = response.buffer()?;
        match self {
            Connection::Plain(s) => s.write_all(&bytes).and_then(|()| s.flush()),
            Connection::Tls(s) => s.write_all(&bytes).and_then(|()| s.flush()),
        }
    }
}

fn serve(
    stream: TcpStream,
    security: Security,
    tls: Option<Arc<ServerConfig>>,
    script: Script,
    sink: Arc<Mutex<Vec<Received>>>,
) -> io::Result<()> {
    let peer = stream.peer_addr()?.ip();
    let encrypted = Arc::new(AtomicBool::new(false));
    let mut builder = SessionBuilder::new("caremsg-test-smtp");
    if security != Security::Plain {
        builder.enable_start_tls();
    }
    if script.credentials.is_some() {
        builder.enable_auth(AuthMechanism::Plain);
        builder.enable_auth(AuthMechanism::Login);
        if security == Security::Plain {
            builder.insecure_enable_plaintext_auth();
        }
    }
    let handler = Recorder {
        script,
        current: Received::default(),
        tls: encrypted.clone(),
        sink,
    };
    let mut session = builder.build(peer, handler);
    let mut connection = Connection::Plain(stream);
    if let (Security::Tls, Some(config)) = (security, &tls) {
        connection = connection.upgrade(config)?;
        session.tls_active();
        encrypted.store(true, Ordering::SeqCst);
    }
    connection.reply(&session.greeting())?;
    // mailin stays in its DATA state after a refused message (it should return to the
    // state after EHLO), so the server answers the client's QUIT itself then.
    let mut in_data = false;
    let mut refused_data = false;
    while let Some(line) = connection.read_line()? {
        if refused_data {
            let quit = line.len() >= 4 && line[..4].eq_ignore_ascii_case(b"QUIT");
            let (code, text) = if quit {
                (221, "Goodbye")
            } else {
                (503, "Bad sequence of commands after a refused message")
            };
            connection.reply(&Response::custom(code, text.to_owned()))?;
            return Ok(());
        }
        let response = session.process(&line);
        if in_data && line == b".\r\n" {
            in_data = false;
            refused_data = response.is_error;
        } else if response.code == 354 {
            in_data = true;
        }
        match response.action {
            Action::Reply => connection.reply(&response)?,
            Action::NoReply => {}
            Action::Close => {
                connection.reply(&response)?;
                return Ok(());
            }
            Action::UpgradeTls => {
                connection.reply(&response)?;
                let config = tls.as_ref().ok_or_else(|| io::Error::other("no TLS"))?;
                connection = connection.upgrade(config)?;
                session.tls_active();
                encrypted.store(true, Ordering::SeqCst);
            }
        }
    }
    Ok(())
}
