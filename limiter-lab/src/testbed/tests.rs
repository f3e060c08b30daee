//! Tests of the testbed itself. The world test needs root; it skips (with a notice) otherwise.

use super::http::Parse;
use super::*;
use std::net::{Ipv4Addr, Ipv6Addr};

#[test]
fn testbed_ids_and_names() {
    assert_eq!(id_pid("1234x1f"), Some(1234));
    assert_eq!(id_pid("1234x"), None);
    assert_eq!(id_pid("x1"), None);
    assert_eq!(id_pid("12-3x1"), None);
    assert_eq!(id_pid("123xG"), None);
    let n = Names::new("4194304xfff", Path::new("/sys/fs/cgroup/unified"));
    // Interface names are `lt<id>s`: must fit IFNAMSIZ-1 for the largest pid and counter.
    assert!(format!("lt{}s", n.id).len() <= 15);
    assert_eq!(
        n.cgroup,
        Path::new("/sys/fs/cgroup/unified/limiter-tb-4194304xfff")
    );
    assert_eq!(n.dir, Path::new("/tmp/limiter-tb-4194304xfff"));
    assert_eq!(n.bpffs, Path::new("/tmp/limiter-tb-4194304xfff/bpffs"));
    assert_eq!(n.ns_server, "lt-4194304xfff-s");
}

#[test]
fn testbed_commands() {
    let serve = ServeArgs {
        listen: vec!["[::]:8080".parse().expect("addr")],
        log: "/tmp/x.log".into(),
        body_bytes: 5,
        proxy_protocol: false,
    };
    let c = serve_command(Path::new("/bin/limiter-lab"), &serve);
    let args: Vec<_> = c
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        args,
        [
            "testbed",
            "serve",
            "--listen",
            "[::]:8080",
            "--log",
            "/tmp/x.log",
            "--body-bytes",
            "5"
        ]
    );
    let push = PushArgs {
        to: "10.0.0.2:7070".parse().expect("addr"),
        count: 3,
        path: "/hooks/x".into(),
        body_bytes: 9,
    };
    let args: Vec<_> = push_command(Path::new("limiter-lab"), &push)
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        args,
        [
            "testbed",
            "push",
            "--to",
            "10.0.0.2:7070",
            "--count",
            "3",
            "--path",
            "/hooks/x",
            "--body-bytes",
            "9"
        ]
    );
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A pid that no process has right now (for fabricated stale leftovers).
fn dead_pid() -> u32 {
    let max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(32768);
    (2..max)
        .rev()
        .find(|p| !Path::new(&format!("/proc/{p}")).exists())
        .expect("a free pid")
}

fn is_bpffs_mounted(p: &Path) -> bool {
    let mi = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    mi.lines().any(|l| {
        let (pre, post) = l.split_once(" - ").unwrap_or_default();
        pre.split(' ').nth(4) == Some(p.to_str().expect("utf8")) && post.starts_with("bpf ")
    })
}

/// `sleep 600`, to be killed by the testbed.
fn sleeper() -> Command {
    let mut c = Command::new("sleep");
    c.arg("600");
    c
}

fn entry(client: impl Into<IpAddr>, method: &str, path: &str, body: usize) -> AccessEntry {
    let client = client.into();
    AccessEntry {
        client,
        peer: client,
        method: method.into(),
        path: path.into(),
        body,
        forwarded: None,
        api_key: None,
    }
}

fn sorted(mut v: Vec<AccessEntry>) -> Vec<AccessEntry> {
    v.sort_by(|a, b| {
        (a.client, &a.method, &a.path, a.body).cmp(&(b.client, &b.method, &b.path, b.body))
    });
    v
}

#[test]
fn testbed_stale_leftovers_are_removed() {
    if !is_root() {
        eprintln!("testbed_stale_leftovers_are_removed: skipped, needs root");
        return;
    }
    // A leftover of a crashed run: its pid is gone; the counter part is unique per test
    // process so parallel runs of this test fabricate different ids.
    let id = format!("{}x{:x}", dead_pid(), 0x10000 + std::process::id());
    let n = Names::new(&id, &cgroup2_mount().expect("cgroup2"));
    let mut orphan = sleeper().spawn().expect("sleep");
    {
        // Fabricate under the sweepers' lock, so no concurrent sweep sees it half made.
        let _lock = sys::lock_dir(Path::new("/tmp")).expect("lock");
        std::fs::create_dir_all(&n.bpffs).expect("mkdir");
        sys::mount_bpffs(&n.bpffs).expect("mount");
        std::fs::create_dir(&n.cgroup).expect("cgroup");
        std::fs::write(n.cgroup.join("cgroup.procs"), orphan.id().to_string()).expect("join");
        run("ip", &["netns", "add", &n.ns_server]).expect("netns");
    }
    // A live testbed of ours must survive the sweep.
    let live = Testbed::new(TestbedOptions {
        name: "stale-check".into(),
        ..Default::default()
    })
    .expect("testbed");
    // Another test process may sweep our leftover first; either way it must be gone.
    let cleaned = cleanup_stale().expect("cleanup");
    assert!(!cleaned.iter().any(|c| c == live.id()));
    assert!(
        !n.dir.exists() && !n.cgroup.exists() && !Path::new(NETNS_DIR).join(&n.ns_server).exists(),
        "leftovers of {id} remain (cleaned {cleaned:?})"
    );
    assert!(sys::mounts_under(&n.dir).is_empty());
    assert!(
        orphan.wait().expect("wait").code().is_none(),
        "the orphan was not killed"
    );
    assert!(live.cgroup().exists() && live.dir().exists());
    live.close().expect("teardown");
}

#[test]
fn testbed_world_end_to_end() {
    if !is_root() {
        eprintln!("testbed_world_end_to_end: skipped, needs root");
        return;
    }
    let t0 = Instant::now();
    let tb = Testbed::new(TestbedOptions {
        name: "tbtest".into(),
        clients_v4: 2,
        clients_v6: 1,
    })
    .expect("testbed");
    eprintln!(
        "testbed {} built in {:?}: server {} / {}",
        tb.id(),
        t0.elapsed(),
        tb.server_v4(),
        tb.server_v6()
    );
    let id = tb.id().to_string();
    let (cgroup, dir, bpffs) = (
        tb.cgroup().to_path_buf(),
        tb.dir().to_path_buf(),
        tb.bpffs().to_path_buf(),
    );
    assert!(cgroup.join("cgroup.procs").exists());
    assert!(
        is_bpffs_mounted(&bpffs),
        "bpffs not mounted at {}",
        bpffs.display()
    );
    assert_eq!(tb.clients_v4().len(), 2);
    assert_eq!(tb.clients_v6().len(), 1);

    // The API server: in-process, but its listeners belong to the testbed cgroup.
    let log = dir.join("access.log");
    let addrs: [SocketAddr; 2] = [
        (Ipv6Addr::UNSPECIFIED, 8080).into(),
        (Ipv4Addr::UNSPECIFIED, 9090).into(),
    ];
    let server =
        serve_in_thread(tb.server_listeners(&addrs).expect("listeners"), &log, 3).expect("server");
    tb.wait_listening(Side::Server, 8080, Duration::from_secs(5))
        .expect("8080 listening");
    tb.wait_listening(Side::Server, 9090, Duration::from_secs(5))
        .expect("9090 listening");
    let ss = Command::new("ip")
        .args([
            "netns",
            "exec",
            tb.netns(Side::Server),
            "ss",
            "-Hltn",
            "--cgroup",
        ])
        .output()
        .expect("ss");
    let ss = String::from_utf8_lossy(&ss.stdout);
    eprintln!("ss in the server netns:\n{ss}");
    if ss.contains("cgroup:") {
        // ss prints the path, or "unreachable:<id>" when its /sys has no cgroup2 mount; the
        // cgroup id is the directory's inode number.
        use std::os::unix::fs::MetadataExt;
        let ino = std::fs::metadata(&cgroup).expect("cgroup").ino();
        let names = [
            format!("cgroup:/limiter-tb-{id}"),
            format!("cgroup:unreachable:{ino:x}"),
        ];
        let ours = |l: &&str| l.split_whitespace().any(|w| names.iter().any(|n| n == w));
        assert_eq!(
            ss.lines().filter(ours).count(),
            2,
            "listeners not in the cgroup"
        );
    }

    // spawn_in_server: in the netns and the cgroup; spawn_in_client: in the client netns.
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "cat /proc/self/cgroup; ip -o addr show"])
        .stdout(Stdio::piped());
    let out = tb
        .spawn_in_server(cmd)
        .expect("spawn")
        .wait_with_output()
        .expect("output");
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(out.contains(&format!("0::/limiter-tb-{id}\n")), "{out}");
    assert!(
        out.contains(&format!("inet {}/24", tb.server_v4())),
        "{out}"
    );
    let mut cmd = Command::new("ip");
    cmd.args(["-o", "addr", "show"]).stdout(Stdio::piped());
    let out = tb
        .spawn_in_client(cmd)
        .expect("spawn")
        .wait_with_output()
        .expect("output");
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.contains(&format!("inet {}/24", tb.clients_v4()[1]))
            && out.contains(&format!("inet6 {}/64", tb.clients_v6()[0])),
        "{out}"
    );
    // Children left running: the testbed must kill (and reap) them.
    let sleepers: Vec<Child> = vec![
        tb.spawn_in_server(sleeper()).expect("sleep"),
        tb.spawn_in_client(sleeper()).expect("sleep"),
    ];
    assert!(tb.in_server(|| listening(8080)));

    let (s4, s6) = (tb.server_v4(), tb.server_v6());
    let (c4, c6, p4) = (
        tb.clients_v4().to_vec(),
        tb.clients_v6().to_vec(),
        tb.client_primary_v4(),
    );
    let upload: Vec<u8> = (0..5000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let garbage: Vec<u8> = [0x16, 0x03, 0x01, 0x01, 0x27]
        .into_iter()
        .chain(std::iter::repeat_n(0xab, 295))
        .collect();
    tb.in_client(|| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async {
            let v4: SocketAddr = (s4, 8080).into();
            let ka = http_requests(c4[0].into(), v4, &[Request::get("/a"), Request::get("/media/b"), Request::get("/c")], true)
                .await
                .expect("keep-alive");
            assert_eq!(ka.iter().map(|r| r.status).collect::<Vec<_>>(), [200, 200, 200]);
            assert_eq!(ka[1].text(), "ok GET /media/b\nxxx");
            assert_eq!(ka[1].header("content-type"), Some("text/plain"));
            let pc = http_requests(c4[1].into(), v4, &[Request::get("/d"), Request::get("/e")], false).await.expect("per connection");
            assert!(pc.iter().all(|r| r.status == 200 && r.header("connection") == Some("close")));
            let v6 = http_requests(
                c6[0].into(),
                (s6, 8080).into(),
                &[Request::get("/v6a"), Request::post("/v6b", b"0123456789".to_vec())],
                true,
            )
            .await
            .expect("v6");
            assert_eq!(v6[1].text(), "ok POST /v6b\nxxx");
            let up = http_requests(c4[0].into(), (s4, 9090).into(), &[Request::post("/upload", upload.clone()).in_chunks(4)], true)
                .await
                .expect("chunked upload");
            assert_eq!(up[0].status, 200);
            let chunked = b"POST /chunked HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
            let back = send_raw(p4.into(), (s4, 9090).into(), chunked).await.expect("raw chunked");
            let Parse::Done(p) = parse_response(&back, "POST", true) else { panic!("bad answer {back:?}") };
            assert_eq!(p.response.text(), "ok POST /chunked\nxxx");
            let back = send_raw(c6[0].into(), (s6, 8080).into(), &garbage).await.expect("garbage");
            assert!(back.is_empty(), "garbage got an answer: {back:?}");
            // Idle connections stay open; a reset one leaves no log line.
            let idle = open_idle(c4[1].into(), v4).await.expect("idle");
            tokio::time::sleep(Duration::from_millis(50)).await;
            reset(idle).expect("reset");
        })
    });

    let got = sorted(read_access_log(&log).expect("access log"));
    let want = sorted(vec![
        entry(c4[0], "GET", "/a", 0),
        entry(c4[0], "GET", "/media/b", 0),
        entry(c4[0], "GET", "/c", 0),
        entry(c4[1], "GET", "/d", 0),
        entry(c4[1], "GET", "/e", 0),
        entry(c6[0], "GET", "/v6a", 0),
        entry(c6[0], "POST", "/v6b", 10),
        entry(c4[0], "POST", "/upload", 5000),
        entry(p4, "POST", "/chunked", 11),
        entry(c6[0], "GARBAGE", "-", 300),
    ]);
    assert_eq!(got, want);

    // Pushes: the API host (cgroup socket, and `push_main` inside the server netns) to a
    // receiver in the client netns.
    let hooks = dir.join("hooks.log");
    let receiver = serve_in_thread(
        tb.client_listeners(&[(Ipv6Addr::UNSPECIFIED, 7070).into()])
            .expect("receiver"),
        &hooks,
        0,
    )
    .expect("serve");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let sock = tb.server_socket(false).expect("cgroup socket");
        let mut conn = HttpConn::connect_socket(sock, (tb.client_primary_v4(), 7070).into())
            .await
            .expect("connect");
        assert_eq!(conn.local_addr().expect("local").ip(), IpAddr::from(s4));
        push_on(&mut conn, 3, "/hooks/event", 64)
            .await
            .expect("push");
    });
    let to: SocketAddr = (tb.client_primary_v6(), 7070).into();
    tb.in_server(|| {
        push_main(PushArgs {
            to,
            count: 2,
            path: "/hooks/v6".into(),
            body_bytes: 10,
        })
    })
    .expect("push_main");
    let got = sorted(read_access_log(&hooks).expect("hooks log"));
    let mut want = vec![entry(s4, "POST", "/hooks/event", 64); 3];
    want.extend(vec![entry(s6, "POST", "/hooks/v6", 10); 2]);
    assert_eq!(got, sorted(want));
    // A receiver that is gone makes push_main fail (bounded).
    drop(receiver);
    let t = Instant::now();
    assert!(
        tb.in_server(|| push_main(PushArgs {
            to,
            count: 1,
            path: "/x".into(),
            body_bytes: 1
        }))
        .is_err()
    );
    assert!(t.elapsed() < PUSH_TIMEOUT);

    server.stop().expect("server");
    tb.close().expect("teardown");
    assert!(!Path::new(NETNS_DIR).join(format!("lt-{id}-s")).exists());
    assert!(!Path::new(NETNS_DIR).join(format!("lt-{id}-c")).exists());
    assert!(!cgroup.exists(), "cgroup left behind");
    assert!(
        !Path::new(&format!("{}-c", cgroup.display())).exists(),
        "client cgroup left behind"
    );
    assert!(
        !is_bpffs_mounted(&bpffs) && sys::mounts_under(&dir).is_empty(),
        "bpffs left mounted"
    );
    assert!(!dir.exists(), "scratch dir left behind");
    for child in sleepers {
        let pid = child.id();
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "child {pid} survived"
        );
    }
    eprintln!("testbed {id}: whole test took {:?}", t0.elapsed());
}
