//! `serve` on this process's stdin and stdout: pipes polled directly, or a VM
//! level's virtio-serial relay port.

use std::time::Duration;

use super::{ServeOptions, serve};

/// Serves one parent on stdin/stdout until it goes away. Returns the exit code.
pub async fn serve_stdio(opts: ServeOptions) -> u8 {
    // Pipes (a local parent, OpenSSH's exec channels) are polled directly; tokio's
    // stdin/stdout go through a blocking thread per read and write, which costs
    // tens of microseconds on every hop of every call.
    let result = match stdio_pipes() {
        Some((rx, tx)) => serve(rx, tx, opts).await,
        None => serve(tokio::io::stdin(), tokio::io::stdout(), opts).await,
    };
    crate::process::kill_all();
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("matryoshka serve: {e}");
            1
        }
    }
}

fn stdio_pipes() -> Option<(
    tokio::net::unix::pipe::Receiver,
    tokio::net::unix::pipe::Sender,
)> {
    use std::os::fd::AsFd;
    let stdin = std::io::stdin().as_fd().try_clone_to_owned().ok()?;
    let stdout = std::io::stdout().as_fd().try_clone_to_owned().ok()?;
    if is_serial_port(&stdin) {
        // A VM level's relay port (virtio-serial). Its host end is connected before
        // the guest boots; wait for that all the same, since a read with the host
        // away returns end-of-file. The port is then used in blocking mode through
        // tokio's stdio threads: polled non-blocking with epoll, its second write
        // never reached the host (seen here on Linux 6.1).
        wait_writable(&stdout);
        return None;
    }
    let rx = tokio::net::unix::pipe::Receiver::from_owned_fd(stdin).ok()?;
    let tx = tokio::net::unix::pipe::Sender::from_owned_fd(stdout).ok()?;
    Some((rx, tx))
}

/// Whether this process's stdin is a VM level's relay port (a virtio-serial
/// port).
pub fn stdin_is_serial_port() -> bool {
    use std::os::fd::AsFd;
    std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .is_ok_and(|fd| is_serial_port(&fd))
}

/// Whether `fd` is a virtio-serial port: a character device that sysfs places
/// under `virtio-ports`. Not any character device: a runtime started with
/// stdin from `/dev/null` (CI, a fuzzer calling `serve` in-process) is no VM
/// level, and must neither set this machine's clock nor read its kernel log
/// for a parent.
fn is_serial_port(fd: &std::os::fd::OwnedFd) -> bool {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let Ok(file) = fd.try_clone().map(std::fs::File::from) else {
        return false;
    };
    // SAFETY: isatty(3) only inspects the descriptor.
    let tty = unsafe { libc::isatty(fd.as_raw_fd()) } == 1;
    let Ok(meta) = file.metadata() else {
        return false;
    };
    if tty || !meta.file_type().is_char_device() {
        return false;
    }
    let rdev = meta.rdev();
    let device = format!("/sys/dev/char/{}:{}", libc::major(rdev), libc::minor(rdev));
    std::fs::canonicalize(device).is_ok_and(|p| {
        p.components()
            .any(|c| c.as_os_str() == std::ffi::OsStr::new("virtio-ports"))
    })
}

/// Blocks until `fd` can be written: a virtio-serial port is writable only while
/// its host end is connected.
fn wait_writable(fd: &std::os::fd::OwnedFd) {
    use std::os::fd::AsRawFd;
    loop {
        let mut poll = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: one valid pollfd, for the duration of the call.
        let n = unsafe { libc::poll(&mut poll, 1, 1000) };
        if n > 0 && poll.revents & libc::POLLOUT != 0 {
            return;
        }
        // With the host away the port reports a hang-up at once: look again soon.
        if n != 0 {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::is_serial_port;

    #[test]
    fn dev_null_and_pipes_are_no_serial_port() {
        let null = std::fs::File::open("/dev/null").expect("/dev/null");
        assert!(!is_serial_port(&std::os::fd::OwnedFd::from(null)));
        let (reader, _writer) = std::io::pipe().expect("a pipe");
        assert!(!is_serial_port(&std::os::fd::OwnedFd::from(reader)));
    }
}
