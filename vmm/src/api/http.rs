//! Just enough HTTP/1.1 for the control API, on a blocking stream: read one request (head
//! parsed by `httparse`, body by Content-Length), write one response. Every size is bounded
//! and every malformed input becomes a [`Response`] with a 4xx status, never a panic.

use std::io::{Read, Write};

use vm_spec::api::ApiError;

/// Largest request head (request line and headers).
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Largest request body.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
const MAX_HEADERS: usize = 32;

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub body: Vec<u8>,
    /// The client asked to close the connection after this request (`Connection: close`).
    pub close: bool,
}

/// A response: status, content type and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json<T: serde::Serialize>(status: u16, value: &T) -> Self {
        match serde_json::to_vec(value) {
            Ok(body) => Self {
                status,
                content_type: "application/json",
                body,
            },
            Err(e) => Self::error(500, format!("cannot encode the answer: {e}")),
        }
    }

    pub fn error(status: u16, message: impl Into<String>) -> Self {
        let error = ApiError {
            error: message.into(),
        };
        Self {
            status,
            content_type: "application/json",
            body: serde_json::to_vec(&error).unwrap_or_default(),
        }
    }

    pub fn no_content() -> Self {
        Self::no_content_with(204)
    }

    /// An answer without a body (204, or 202 for an accepted request still under way).
    pub fn no_content_with(status: u16) -> Self {
        Self {
            status,
            content_type: "application/json",
            body: Vec::new(),
        }
    }

    pub fn text(body: String) -> Self {
        Self {
            status: 200,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: body.into_bytes(),
        }
    }
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// What reading a request gave.
#[derive(Debug)]
pub enum ReadOutcome {
    Request(Request),
    /// The client closed the connection before sending a request.
    Closed,
    /// The request was malformed: answer this and close.
    Bad(Response),
}

/// Reads one request from `stream`. `pending` carries bytes read past the previous request
/// (pipelining) and keeps those past this one.
pub fn read_request(stream: &mut impl Read, pending: &mut Vec<u8>) -> ReadOutcome {
    let mut chunk = [0u8; 2048];
    // The head.
    let (head_len, method, path, content_length, close) = loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(pending) {
            Ok(httparse::Status::Complete(len)) => {
                let method = req.method.unwrap_or_default().to_string();
                let path = req.path.unwrap_or_default().to_string();
                let mut content_length: Option<usize> = None;
                let mut close = req.version == Some(0);
                for header in req.headers.iter() {
                    let name = header.name.to_ascii_lowercase();
                    let value = String::from_utf8_lossy(header.value).trim().to_string();
                    match name.as_str() {
                        "content-length" => match value.parse::<usize>() {
                            Ok(n) if content_length.is_none_or(|c| c == n) => {
                                content_length = Some(n)
                            }
                            _ => {
                                return ReadOutcome::Bad(Response::error(
                                    400,
                                    format!("invalid Content-Length {value:?}"),
                                ))
                            }
                        },
                        "transfer-encoding" => {
                            return ReadOutcome::Bad(Response::error(
                                501,
                                "Transfer-Encoding is not supported: send a Content-Length",
                            ))
                        }
                        "connection" if value.eq_ignore_ascii_case("close") => close = true,
                        _ => {}
                    }
                }
                break (len, method, path, content_length.unwrap_or(0), close);
            }
            Ok(httparse::Status::Partial) => {
                if pending.len() >= MAX_HEAD_BYTES {
                    return ReadOutcome::Bad(Response::error(
                        431,
                        format!("the request head is larger than {MAX_HEAD_BYTES} bytes"),
                    ));
                }
            }
            Err(httparse::Error::TooManyHeaders) => {
                return ReadOutcome::Bad(Response::error(
                    431,
                    format!("more than {MAX_HEADERS} headers"),
                ))
            }
            Err(e) => {
                return ReadOutcome::Bad(Response::error(400, format!("malformed request: {e}")))
            }
        }
        match stream.read(&mut chunk) {
            Ok(0) if pending.is_empty() => return ReadOutcome::Closed,
            Ok(0) => {
                return ReadOutcome::Bad(Response::error(400, "the request ended in its head"))
            }
            Ok(n) => pending.extend_from_slice(&chunk[..n]),
            Err(e) if is_timeout(&e) => {
                if pending.is_empty() {
                    return ReadOutcome::Closed;
                }
                return ReadOutcome::Bad(Response::error(408, "the request came too slowly"));
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return ReadOutcome::Closed,
        }
    };
    if content_length > MAX_BODY_BYTES {
        return ReadOutcome::Bad(Response::error(
            413,
            format!("the body ({content_length} bytes) is larger than {MAX_BODY_BYTES} bytes"),
        ));
    }
    pending.drain(..head_len);
    while pending.len() < content_length {
        match stream.read(&mut chunk) {
            Ok(0) => {
                return ReadOutcome::Bad(Response::error(
                    400,
                    format!(
                        "the body ended after {} of {content_length} bytes",
                        pending.len()
                    ),
                ))
            }
            Ok(n) => pending.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => {
                return ReadOutcome::Bad(Response::error(408, "the body came too slowly"))
            }
            Err(_) => return ReadOutcome::Closed,
        }
    }
    let body: Vec<u8> = pending.drain(..content_length).collect();
    ReadOutcome::Request(Request {
        method,
        path,
        body,
        close,
    })
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// Writes `response` (HTTP/1.1, with Content-Length).
pub fn write_response(
    stream: &mut impl Write,
    response: &Response,
    close: bool,
) -> std::io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nServer: vmm\r\nContent-Length: {}\r\n",
        response.status,
        reason_phrase(response.status),
        response.body.len()
    );
    if !response.body.is_empty() {
        out.push_str(&format!("Content-Type: {}\r\n", response.content_type));
    }
    if close {
        out.push_str("Connection: close\r\n");
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(&response.body);
    stream.write_all(&bytes)?;
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(bytes: &[u8]) -> ReadOutcome {
        let mut pending = Vec::new();
        read_request(&mut &bytes[..], &mut pending)
    }

    fn status(outcome: ReadOutcome) -> u16 {
        match outcome {
            ReadOutcome::Bad(r) => r.status,
            other => panic!("expected a bad request, got {other:?}"),
        }
    }

    #[test]
    fn a_request_with_a_body_is_read_whole() {
        let raw = b"PUT /vm/actions HTTP/1.1\r\nHost: x\r\nContent-Length: 17\r\n\r\n{\"action\":\"kill\"}";
        match read(raw) {
            ReadOutcome::Request(r) => {
                assert_eq!(r.method, "PUT");
                assert_eq!(r.path, "/vm/actions");
                assert_eq!(r.body, b"{\"action\":\"kill\"}");
                assert!(!r.close);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn pipelined_requests_are_read_one_by_one() {
        let raw = b"GET /vm HTTP/1.1\r\n\r\nGET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n";
        let mut stream = &raw[..];
        let mut pending = Vec::new();
        let ReadOutcome::Request(first) = read_request(&mut stream, &mut pending) else {
            panic!("first");
        };
        let ReadOutcome::Request(second) = read_request(&mut stream, &mut pending) else {
            panic!("second");
        };
        assert_eq!(
            (first.path.as_str(), second.path.as_str()),
            ("/vm", "/metrics")
        );
        assert!(second.close);
        assert!(matches!(
            read_request(&mut stream, &mut pending),
            ReadOutcome::Closed
        ));
    }

    #[test]
    fn malformed_and_oversized_requests_are_refused_with_a_status() {
        assert_eq!(status(read(b"GARBAGE\x01 / HTTP/1.1\r\n\r\n")), 400);
        let mut huge_head = b"GET / HTTP/1.1\r\n".to_vec();
        while huge_head.len() <= MAX_HEAD_BYTES {
            huge_head.extend_from_slice(b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        assert!(matches!(status(read(&huge_head)), 431));
        let big_body = format!(
            "PUT /vm/actions HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY_BYTES + 1
        );
        assert_eq!(status(read(big_body.as_bytes())), 413);
        assert_eq!(
            status(read(
                b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            )),
            501
        );
        assert_eq!(
            status(read(b"PUT / HTTP/1.1\r\nContent-Length: -1\r\n\r\n")),
            400
        );
        assert_eq!(
            status(read(
                b"PUT / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"
            )),
            400
        );
        assert_eq!(
            status(read(b"PUT / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")),
            400
        );
        assert_eq!(status(read(b"GET / HTTP/1.1\r\nHost")), 400);
    }

    #[test]
    fn responses_carry_length_and_json_errors() {
        let mut out = Vec::new();
        write_response(&mut out, &Response::error(404, "no route GET /x"), true).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 404 Not Found\r\n"));
        assert!(text.contains("Connection: close\r\n"));
        let body = text.split("\r\n\r\n").nth(1).unwrap();
        let error: ApiError = serde_json::from_str(body).unwrap();
        assert_eq!(error.error, "no route GET /x");
        assert!(text.contains(&format!("Content-Length: {}\r\n", body.len())));
    }
}
