//! Debian's nginx as the tests run it: a private prefix directory (configuration, logs, pid and
//! temp files), the shipped `http`-level configuration included as it is, in the foreground,
//! killed and its directory removed on drop.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

/// A process the test started with a directory of its own (configuration and logs): killed,
/// waited for and the directory removed on drop.
#[derive(Debug)]
pub struct Daemon {
    child: Child,
    dir: PathBuf,
}

impl Daemon {
    /// Takes `child` and `dir` (made by [`daemon_dir`]) into the guard.
    pub fn new(child: Child, dir: PathBuf) -> Self {
        Self { child, dir }
    }

    /// The file `name` of its directory (a log), empty when there is none.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(name)).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A new empty directory for a daemon of this test process, named by `tag`.
///
/// # Panics
///
/// When it cannot be made.
pub fn daemon_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("whep-e2e-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{dir:?}: {e}"));
    dir
}

/// Writes `http_conf` (directives of nginx's `http` block: `map`, `upstream`, `server`) and a
/// main configuration including it into `dir`, and returns nginx's arguments for it. The
/// access log records `method uri status upstream upstream_status` per request.
///
/// # Errors
///
/// When a file cannot be written.
pub fn configure(dir: &Path, http_conf: &str) -> io::Result<Vec<String>> {
    std::fs::write(dir.join("site.conf"), http_conf)?;
    let d = dir.display();
    // As root nginx's workers would switch to `nobody`: keep root so they can write the temp dir.
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    let user = if root { "user root;" } else { "" };
    let main = format!(
        "{user}\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\nworker_processes 1;\n\
         events {{ worker_connections 256; }}\nhttp {{\n\
         log_format up '$request_method $uri $status $upstream_addr $upstream_status';\n\
         access_log {d}/access.log up;\n\
         client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;\n\
         fastcgi_temp_path {d}/fastcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
         include {d}/site.conf;\n}}\n"
    );
    std::fs::write(dir.join("nginx.conf"), main)?;
    Ok(vec![
        "-p".into(),
        d.to_string(),
        "-c".into(),
        format!("{d}/nginx.conf"),
        "-e".into(),
        format!("{d}/error.log"),
    ])
}

/// Starts nginx with `http_conf` in the network namespace `netns` (or here), in the
/// foreground; its logs are `error.log` and `access.log` of the guard.
///
/// # Errors
///
/// When the files cannot be written or nginx cannot be run (not installed:
/// `bash scripts/test.sh` installs Debian's).
pub fn start(netns: Option<&str>, tag: &str, http_conf: &str) -> io::Result<Daemon> {
    let dir = daemon_dir(tag);
    let args = configure(&dir, http_conf)?;
    let child = crate::command_in(netns, "nginx")
        .args(&args)
        .args(["-g", "daemon off;"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    Ok(Daemon::new(child, dir))
}

/// `nginx -t` of `http_conf`: `Ok` with nginx's report when it accepts it, `Err` with it when
/// not.
///
/// # Errors
///
/// When nginx rejects the configuration (its message), or cannot be run.
pub fn check(http_conf: &str) -> Result<String, String> {
    let dir = daemon_dir("nginx-t");
    let out: io::Result<Output> = configure(&dir, http_conf)
        .and_then(|args| Command::new("nginx").args(&args).arg("-t").output());
    let _ = std::fs::remove_dir_all(&dir);
    let out = out.map_err(|e| format!("nginx: {e}"))?;
    let report = String::from_utf8_lossy(&out.stderr).into_owned();
    if out.status.success() { Ok(report) } else { Err(report) }
}
