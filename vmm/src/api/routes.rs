//! The control API's routes: each turns a request into a call on [`VmControl`] and its result
//! into a response. Bodies are parsed strictly (unknown fields refused).

use serde::de::DeserializeOwned;
use vm_spec::api::{DevicePatch, VmAction, VmActionRequest};

use super::http::{Request, Response};
use crate::control::{ActionError, VmControl};
use crate::vstate::run_state::RunStateError;

/// The routes, as (method, path pattern); `{id}` matches one path segment.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/vm"),
    ("PUT", "/vm/actions"),
    ("GET", "/metrics"),
    ("PATCH", "/devices/{id}"),
];

pub fn handle(control: &VmControl, request: &Request) -> Response {
    let path = request.path.split('?').next().unwrap_or_default();
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let method = request.method.as_str();
    match (method, segments.as_slice()) {
        ("GET", ["vm"]) => Response::json(200, &control.info()),
        ("PUT", ["vm", "actions"]) => match parse::<VmActionRequest>(&request.body) {
            Ok(req) => act(control, req.action),
            Err(response) => response,
        },
        ("GET", ["metrics"]) => Response::text(super::metrics::render(control)),
        ("PATCH", ["devices", id]) if !id.is_empty() => match parse::<DevicePatch>(&request.body) {
            Ok(patch) => match control.patch_device(id, &patch) {
                Ok(()) => Response::no_content(),
                Err(e @ ActionError::UnknownDevice(_)) => Response::error(404, e.to_string()),
                Err(e) => Response::error(400, e.to_string()),
            },
            Err(response) => response,
        },
        _ => {
            let known_path = ROUTES
                .iter()
                .any(|(_, pattern)| matches_pattern(pattern, &segments));
            if known_path {
                let allowed: Vec<&str> = ROUTES
                    .iter()
                    .filter(|(_, pattern)| matches_pattern(pattern, &segments))
                    .map(|(m, _)| *m)
                    .collect();
                Response::error(
                    405,
                    format!(
                        "{method} is not allowed on {path}; use {}",
                        allowed.join(", ")
                    ),
                )
            } else {
                Response::error(404, format!("no route {method} {}", printable(path)))
            }
        }
    }
}

fn matches_pattern(pattern: &str, segments: &[&str]) -> bool {
    let parts: Vec<&str> = pattern.split('/').skip(1).collect();
    parts.len() == segments.len()
        && parts
            .iter()
            .zip(segments)
            .all(|(p, s)| *p == *s || (p.starts_with('{') && !s.is_empty()))
}

/// At most 200 characters of a client-given path, for error messages.
fn printable(path: &str) -> String {
    path.chars().take(200).collect()
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, Response> {
    if body.is_empty() {
        return Err(Response::error(400, "the request needs a JSON body"));
    }
    serde_json::from_slice(body)
        .map_err(|e| Response::error(400, format!("invalid request body: {e}")))
}

fn act(control: &VmControl, action: VmAction) -> Response {
    match control.act(action) {
        Ok(()) if action == VmAction::Shutdown => Response::no_content_with(202),
        Ok(()) => Response::no_content(),
        Err(e) => {
            let status = match &e {
                ActionError::RunState {
                    source: RunStateError::Timeout { .. },
                    ..
                } => 503,
                ActionError::RunState { .. } | ActionError::Ending | ActionError::ShuttingDown => {
                    409
                }
                _ => 400,
            };
            Response::error(status, e.to_string())
        }
    }
}
