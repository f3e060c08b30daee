//! The control socket between the CLI (`limiter report`, `reset`, ...) and the running daemon:
//! one JSON request line, one JSON response line, over a Unix socket only root can open.

use std::{
    collections::VecDeque,
    io::{BufRead, BufReader, Write},
    os::unix::{fs::PermissionsExt, net::UnixStream},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::value::RawValue;
use thiserror::Error;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt},
    net::{UnixListener, UnixStream as AsyncUnixStream},
    sync::{mpsc, oneshot},
    task::JoinHandle,
};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    /// Usage of `day` ("YYYY-MM-DD"; default today), of one org or all.
    Report {
        org: Option<String>,
        day: Option<String>,
    },
    /// Clear today's counters of one org, or of all when `org` is None.
    Reset { org: Option<String> },
    /// Re-read the config file.
    Reload,
    /// Stop the daemon; with `unload`, also remove everything it pinned (programs detach).
    Shutdown { unload: bool },
    /// Test hook: step the daemon's clock (and so the kernel's day) forward or back by `secs`.
    /// With `kernel_only`, only the kernel's clock moves, as it does first on an NTP step; the
    /// daemon sees the step once a later request moves its own clock by as much.
    AdvanceClock {
        secs: i64,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        kernel_only: bool,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Kept as JSON text: a report of a million orgs as a `serde_json::Value` took gigabytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Box<RawValue>>,
}

impl Response {
    pub fn ok(data: impl Serialize) -> Self {
        match serde_json::value::to_raw_value(&data) {
            Ok(raw) => Response {
                ok: true,
                error: None,
                data: Some(raw),
            },
            Err(e) => Response::err(format!("encoding the answer: {e}")),
        }
    }

    pub fn err(msg: impl Into<String>) -> Self {
        Response {
            ok: false,
            error: Some(msg.into()),
            data: None,
        }
    }

    /// The answer's data as `T` (JSON `null` when there is none).
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_str(self.data.as_deref().map_or("null", RawValue::get))
    }
}

#[derive(Debug, Error)]
pub enum ControlError {
    #[error(
        "cannot reach the limiter daemon at {path}: {source} (is `limiter run` running with this config?)"
    )]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the limiter daemon at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the limiter daemon sent a malformed answer: {0}")]
    Malformed(#[from] serde_json::Error),
}

/// Sends one request to the daemon and waits for its answer (CLI side, blocking).
pub fn call(path: &Path, req: &Request) -> Result<Response, ControlError> {
    let io = |source| ControlError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut stream = UnixStream::connect(path).map_err(|source| ControlError::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(io)?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    stream.write_all(&line).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).map_err(io)?;
    Ok(serde_json::from_str(&answer)?)
}

/// A request waiting for the daemon's main loop to answer it.
pub struct Pending {
    pub request: Request,
    pub reply: oneshot::Sender<Response>,
}

/// Binds the control socket with mode 0600, replacing a stale one but never a live daemon's.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if UnixStream::connect(path).is_ok() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!("another limiter daemon answers on {}", path.display()),
        ));
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // Created without group/other bits from the start, not chmod-ed afterwards.
    // SAFETY: umask only swaps the process's file mode mask.
    let old = unsafe { libc::umask(0o077) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener = bound?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Longest request line accepted from the CLI.
pub const MAX_REQUEST: u64 = 64 * 1024;
/// A CLI connection that sends no complete request in this time is dropped.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// CLI connections served at once; one more closes the oldest that has not sent its request
/// yet, so clients that connect and hold on can neither take the daemon's file descriptors nor
/// lock the CLI out.
pub const MAX_CONNECTIONS: usize = 32;
/// A CLI that does not take its answer in this time is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// Accepts CLI connections and forwards each request to the main loop, so all map access stays
/// on one task.
pub async fn serve(listener: UnixListener, to_daemon: mpsc::Sender<Pending>) {
    let mut live: VecDeque<Connection> = VecDeque::with_capacity(MAX_CONNECTIONS);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                // Out of fds or similar: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        live.retain(|c| !c.task.is_finished());
        if live.len() >= MAX_CONNECTIONS {
            // Full: the oldest connection still waiting for its request goes. One whose
            // request is in hand is answered; when all are, the newcomer is turned away.
            match live.iter().position(|c| c.reading.load(Ordering::Relaxed)) {
                Some(i) => {
                    if let Some(c) = live.remove(i) {
                        c.task.abort();
                    }
                }
                None => continue,
            }
        }
        let reading = Arc::new(AtomicBool::new(true));
        let task = tokio::spawn(answer(stream, to_daemon.clone(), reading.clone()));
        live.push_back(Connection { task, reading });
    }
}

/// A CLI connection being served, and whether it is still waiting for its request.
struct Connection {
    task: JoinHandle<()>,
    reading: Arc<AtomicBool>,
}

/// Reads one request line, has the main loop answer it, and writes the answer back.
async fn answer(
    stream: AsyncUnixStream,
    to_daemon: mpsc::Sender<Pending>,
    reading: Arc<AtomicBool>,
) {
    let (read, mut write) = stream.into_split();
    let mut lines =
        tokio::io::BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_REQUEST)).lines();
    let Ok(Ok(Some(line))) = tokio::time::timeout(REQUEST_TIMEOUT, lines.next_line()).await else {
        return;
    };
    reading.store(false, Ordering::Relaxed);
    let response = match serde_json::from_str::<Request>(&line) {
        Err(e) => Response::err(format!("bad request: {e}")),
        Ok(request) => {
            let (reply, answer) = oneshot::channel();
            if to_daemon.send(Pending { request, reply }).await.is_err() {
                Response::err("the daemon is shutting down")
            } else {
                answer
                    .await
                    .unwrap_or_else(|_| Response::err("the daemon dropped the request"))
            }
        }
    };
    let mut out = serde_json::to_vec(&response).unwrap_or_default();
    out.push(b'\n');
    let _ = tokio::time::timeout(WRITE_TIMEOUT, write.write_all(&out)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_roundtrip_as_tagged_json() {
        let r = Request::Reset {
            org: Some("acme".into()),
        };
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(s, r#"{"cmd":"reset","org":"acme"}"#);
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), r);
        let r = Request::AdvanceClock {
            secs: 86400,
            kernel_only: false,
        };
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(s, r#"{"cmd":"advance-clock","secs":86400}"#);
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), r);
    }

    #[tokio::test]
    async fn a_request_reaches_the_main_loop_and_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let listener = bind(&path).unwrap();
        let (tx, mut rx) = mpsc::channel(4);
        tokio::spawn(serve(listener, tx));
        tokio::spawn(async move {
            while let Some(p) = rx.recv().await {
                let _ = p.reply.send(Response::ok(
                    serde_json::json!({"echo": format!("{:?}", p.request)}),
                ));
            }
        });
        let path2 = path.clone();
        let resp = tokio::task::spawn_blocking(move || call(&path2, &Request::Reload))
            .await
            .unwrap()
            .unwrap();
        assert!(resp.ok);
        assert_eq!(resp.parse::<serde_json::Value>().unwrap()["echo"], "Reload");
        // A second daemon must not take over a live daemon's socket.
        let path3 = path.clone();
        let second = tokio::task::spawn_blocking(move || bind(&path3).map(|_| ()))
            .await
            .unwrap();
        assert!(second.is_err_and(|e| e.to_string().contains("another limiter daemon")));
        let err = call(&dir.path().join("missing.sock"), &Request::Reload).unwrap_err();
        assert!(err.to_string().contains("missing.sock"), "{err}");
    }
}
