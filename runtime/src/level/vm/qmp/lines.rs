//! Reading QMP's lines: one line at a time within [`MAX_LINE`], the greeting,
//! QEMU's error objects, and short quotes of a line for messages.

use serde_json::{Map, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::unix::OwnedReadHalf;

use super::{MAX_LINE, QmpError, SNIPPET_CHARS};

/// Reads one line (without its newline) into `line`, at most [`MAX_LINE`] bytes.
/// `Ok(false)` is the end of the stream (a partial last line is dropped with it).
pub(super) async fn read_line(
    reader: &mut BufReader<OwnedReadHalf>,
    line: &mut Vec<u8>,
    shown: &str,
) -> Result<bool, QmpError> {
    line.clear();
    loop {
        let available = match reader.fill_buf().await {
            Ok(available) => available,
            Err(e) => return Err(read_error(&e, shown)),
        };
        if available.is_empty() {
            return Ok(false);
        }
        let (taken, done) = match available.iter().position(|&b| b == b'\n') {
            Some(end) => (end, true),
            None => (available.len(), false),
        };
        if line.len() + taken > MAX_LINE {
            return Err(QmpError::Protocol(format!(
                "{shown}: a line longer than {MAX_LINE} bytes"
            )));
        }
        line.extend_from_slice(&available[..taken]);
        reader.consume(if done { taken + 1 } else { taken });
        if done {
            return Ok(true);
        }
    }
}

/// The error for a failed read: a reset connection is QEMU gone.
pub(super) fn read_error(error: &std::io::Error, shown: &str) -> QmpError {
    match error.kind() {
        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe => QmpError::Closed,
        _ => QmpError::Io(format!("cannot read the QMP socket {shown}: {error}")),
    }
}

/// QEMU's version `major.minor.micro` from its greeting line.
pub(super) fn parse_greeting(line: &[u8], shown: &str) -> Result<String, QmpError> {
    let refused = || {
        QmpError::Protocol(format!(
            "{shown}: expected the QMP greeting {{\"QMP\": {{\"version\": {{\"qemu\": {{\"major\", \"minor\", \"micro\"}}}}}}}}, got: {}",
            snippet(line)
        ))
    };
    let greeting: Value = serde_json::from_slice(line).map_err(|_| refused())?;
    let qemu = greeting
        .get("QMP")
        .and_then(|q| q.get("version"))
        .and_then(|v| v.get("qemu"))
        .and_then(Value::as_object)
        .ok_or_else(refused)?;
    let part = |name: &str| qemu.get(name).and_then(Value::as_u64).ok_or_else(refused);
    Ok(format!(
        "{}.{}.{}",
        part("major")?,
        part("minor")?,
        part("micro")?
    ))
}

/// QEMU's `{"class", "desc"}` error object as a [`QmpError::Qemu`].
pub(super) fn qemu_error(error: &Value) -> Option<QmpError> {
    let error: &Map<String, Value> = error.as_object()?;
    Some(QmpError::Qemu {
        class: error.get("class")?.as_str()?.to_string(),
        desc: error.get("desc")?.as_str()?.to_string(),
    })
}

/// The start of a line for a message: lossy UTF-8, trimmed, at most
/// [`SNIPPET_CHARS`] characters.
pub(super) fn snippet(line: &[u8]) -> String {
    let head = &line[..line.len().min(SNIPPET_CHARS * 4)];
    let text = String::from_utf8_lossy(head);
    let text = text.trim();
    let mut shown: String = text.chars().take(SNIPPET_CHARS).collect();
    if shown.len() < text.len() || head.len() < line.len() {
        shown.push('…');
    }
    if shown.is_empty() {
        shown.push_str("(an empty line)");
    }
    shown
}
