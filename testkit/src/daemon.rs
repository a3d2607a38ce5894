//! What the test servers ([`crate::postgres`], [`crate::garage`]) share:
//! a directory per test process, free loopback ports, and a server that
//! lives exactly as long as the test process.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A free port on 127.0.0.1.
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A new, empty `<temp>/<prefix><pid>` for this process, after removing
/// the directories of earlier test processes that are gone.
pub(crate) fn fresh_dir(prefix: &str) -> PathBuf {
    let parent = std::env::temp_dir();
    for entry in std::fs::read_dir(&parent).into_iter().flatten().flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    let dir = parent.join(format!("{prefix}{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a directory for the test server");
    dir
}

/// Starts `cmd` as the child of a thread that lives as long as the
/// process, with `signal` as its parent-death signal: the server stops
/// when the test process exits, however it exits.
///
/// # Panics
///
/// If it does not start.
pub(crate) fn spawn_for_life(mut cmd: Command, signal: i32) {
    let (started, spawned) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // SAFETY: prctl is async-signal-safe and the closure touches
        // nothing else between fork and exec.
        #[allow(unsafe_code)]
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, signal) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn();
        let ok = child.is_ok();
        let _ = started.send(child.map(|_| ()).map_err(|e| format!("{cmd:?}: {e}")));
        if ok {
            loop {
                std::thread::park();
            }
        }
    });
    spawned
        .recv()
        .expect("the server's thread")
        .expect("the server starts");
}
