//! Fault injection for the fault tests: a private SecantusDB server that can be killed and
//! restarted on the same port and data, and a loopback TCP proxy whose connections can be
//! cut (a server or network failure, as the client sees it).

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A private `secantusd-rs` (on PATH) with its own data directory.
pub struct Mongod {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    auth: bool,
    extra: Vec<String>,
}

impl Mongod {
    pub fn start() -> Mongod {
        Self::start_with(false)
    }

    /// With `--auth`: every command but the handshake needs SCRAM credentials.
    pub fn start_with(auth: bool) -> Mongod {
        Self::start_args(auth, &[])
    }

    /// With more command-line flags (e.g. `--tls-cert-file`, `--tls-key-file`).
    pub fn start_args(auth: bool, extra: &[&str]) -> Mongod {
        let dir = tempfile::tempdir().unwrap();
        let mut m = Mongod {
            port: 0,
            dir,
            child: None,
            auth,
            extra: extra.iter().map(|a| a.to_string()).collect(),
        };
        m.spawn();
        m
    }

    pub fn uri(&self) -> String {
        format!("mongodb://127.0.0.1:{}/?directConnection=true", self.port)
    }

    fn spawn(&mut self) {
        use std::io::{BufRead, BufReader};
        let mut c = Command::new("secantusd-rs");
        c.args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .arg("--storage-path")
            .arg(self.dir.path())
            .args([
                "--cache-size",
                "256M",
                "--log-file-max",
                "16MB",
                "--log-level",
                "WARNING",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if self.auth {
            c.arg("--auth");
        }
        c.args(&self.extra);
        let mut child = c
            .spawn()
            .expect("secantusd-rs on PATH (scripts/ensure-mongo.sh installs it)");
        let out = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(out).read_line(&mut line).unwrap();
        // "secantusd-rs listening on 127.0.0.1:PORT"
        let port: u16 = line
            .trim()
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected secantusd-rs banner: {line:?}"));
        self.port = port;
        self.child = Some(child);
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "secantusd-rs did not listen"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL the server (no clean shutdown).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().ok();
            c.wait().ok();
        }
    }

    /// Start again on the same port with the same data.
    pub fn restart(&mut self) {
        self.kill();
        let start = Instant::now();
        loop {
            // The port may linger for a moment after a kill.
            if std::net::TcpListener::bind(("127.0.0.1", self.port)).is_ok() {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "port {} stays busy",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self.spawn();
    }
}

impl Drop for Mongod {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A loopback TCP proxy to `upstream`. `cut()` drops every open connection;
/// `set_down(true)` also refuses new ones (accepted and closed at once).
pub struct Proxy {
    pub addr: SocketAddr,
    down: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
    pub cuts: Arc<std::sync::atomic::AtomicU64>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Proxy {
        Self::start_inner(upstream, None).await
    }

    /// A proxy that also records the name of every MongoDB command a client sends
    /// (OP_MSG body section: the first key of the command document).
    pub async fn sniffing(upstream: SocketAddr, commands: Arc<Mutex<Vec<String>>>) -> Proxy {
        Self::start_inner(upstream, Some(commands)).await
    }

    async fn start_inner(upstream: SocketAddr, sniff: Option<Arc<Mutex<Vec<String>>>>) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let down = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Default::default();
        let (d, c) = (down.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                if d.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let sniff = sniff.clone();
                let h = tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    match sniff {
                        None => {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                        Some(log) => {
                            let (mut cr, mut cw) = client.into_split();
                            let (mut sr, mut sw) = server.into_split();
                            let up = async move {
                                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                                loop {
                                    let mut len = [0u8; 4];
                                    if cr.read_exact(&mut len).await.is_err() {
                                        break;
                                    }
                                    let n = i32::from_le_bytes(len) as usize;
                                    let mut msg = vec![0u8; n.saturating_sub(4)];
                                    if cr.read_exact(&mut msg).await.is_err() {
                                        break;
                                    }
                                    if let Some(name) = op_msg_command(&msg) {
                                        log.lock().unwrap().push(name);
                                    }
                                    if sw.write_all(&len).await.is_err()
                                        || sw.write_all(&msg).await.is_err()
                                    {
                                        break;
                                    }
                                }
                            };
                            let down = async move {
                                let _ = tokio::io::copy(&mut sr, &mut cw).await;
                            };
                            tokio::join!(up, down);
                        }
                    }
                });
                let mut g = c.lock().unwrap();
                g.retain(|h| !h.is_finished());
                g.push(h);
            }
        });
        Proxy {
            addr,
            down,
            conns,
            accept,
            cuts: Default::default(),
        }
    }

    /// Drop every open connection (both directions close at once, like a reset).
    pub fn cut(&self) {
        let mut g = self.conns.lock().unwrap();
        let n = g.len();
        for h in g.drain(..) {
            h.abort();
        }
        if n > 0 {
            self.cuts.fetch_add(1, Ordering::SeqCst);
        }
    }

    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
        if down {
            self.cut();
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// The command name of a wire-protocol message (without its 4-byte length): OP_MSG (2013)
/// kind-0 section's first key; OP_QUERY (2004, legacy handshakes) is reported as its name.
fn op_msg_command(msg: &[u8]) -> Option<String> {
    let opcode = i32::from_le_bytes(msg.get(8..12)?.try_into().ok()?);
    match opcode {
        2013 => {
            // requestID, responseTo, opCode (12 bytes), flagBits (4), then sections.
            let mut pos = 16;
            while pos < msg.len() {
                let kind = msg[pos];
                pos += 1;
                let size = i32::from_le_bytes(msg.get(pos..pos + 4)?.try_into().ok()?) as usize;
                if kind == 0 {
                    let doc = bson::RawDocument::from_bytes(msg.get(pos..pos + size)?).ok()?;
                    let (k, _) = doc.into_iter().next()?.ok()?;
                    return Some(k.to_owned());
                }
                pos += size;
            }
            None
        }
        2004 => Some("OP_QUERY".into()),
        2012 => Some("OP_COMPRESSED".into()),
        _ => None,
    }
}
