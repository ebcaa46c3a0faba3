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

/// A request the API understood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    GetVm,
    Action(VmAction),
    Metrics,
    PatchDevice { id: String, patch: DevicePatch },
}

/// Decodes a request into a [`Route`], or the 4xx answer that says what is wrong with it.
/// Needs no VM: the fuzz target drives it with arbitrary requests.
pub fn route(request: &Request) -> Result<Route, Response> {
    let path = request.path.split('?').next().unwrap_or_default();
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let method = request.method.as_str();
    match (method, segments.as_slice()) {
        ("GET", ["vm"]) => Ok(Route::GetVm),
        ("PUT", ["vm", "actions"]) => {
            parse::<VmActionRequest>(&request.body).map(|req| Route::Action(req.action))
        }
        ("GET", ["metrics"]) => Ok(Route::Metrics),
        ("PATCH", ["devices", id]) if !id.is_empty() => {
            parse::<DevicePatch>(&request.body).map(|patch| Route::PatchDevice {
                id: id.to_string(),
                patch,
            })
        }
        _ => {
            let allowed: Vec<&str> = ROUTES
                .iter()
                .filter(|(_, pattern)| matches_pattern(pattern, &segments))
                .map(|(m, _)| *m)
                .collect();
            Err(if allowed.is_empty() {
                Response::error(404, format!("no route {method} {}", printable(path)))
            } else {
                Response::error(
                    405,
                    format!(
                        "{method} is not allowed on {}; use {}",
                        printable(path),
                        allowed.join(", ")
                    ),
                )
            })
        }
    }
}

pub fn handle(control: &VmControl, request: &Request) -> Response {
    match route(request) {
        Ok(Route::GetVm) => Response::json(200, &control.info()),
        Ok(Route::Action(action)) => act(control, action),
        Ok(Route::Metrics) => Response::text(super::metrics::render(control)),
        Ok(Route::PatchDevice { id, patch }) => match control.patch_device(&id, &patch) {
            Ok(()) => Response::no_content(),
            Err(e @ ActionError::UnknownDevice(_)) => Response::error(404, e.to_string()),
            Err(e) => Response::error(400, e.to_string()),
        },
        Err(response) => response,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, path: &str, body: &str) -> Request {
        Request {
            method: method.into(),
            path: path.into(),
            body: body.as_bytes().to_vec(),
            close: false,
        }
    }

    #[test]
    fn routes_decode_strictly() {
        assert_eq!(route(&req("GET", "/vm?x=1", "")), Ok(Route::GetVm));
        assert_eq!(
            route(&req("PUT", "/vm/actions", r#"{"action":"resume"}"#)),
            Ok(Route::Action(VmAction::Resume))
        );
        assert!(matches!(
            route(&req("PATCH", "/devices/data", r#"{"rate_limiter":{}}"#)),
            Ok(Route::PatchDevice { id, .. }) if id == "data"
        ));
        assert!(matches!(
            route(&req(
                "PATCH",
                "/devices/net0",
                r#"{"rate_limiter":{"rx":{"bandwidth":{"size":1000,"refill_time_ms":100}},"tx":{}}}"#
            )),
            Ok(Route::PatchDevice { id, patch }) if id == "net0"
                && matches!(patch.rate_limiter, vm_spec::api::RateLimiterPatch::RxTx(l) if l.rx.is_some())
        ));
        let status = |r: Result<Route, Response>| r.map_err(|e| e.status).err();
        assert_eq!(
            status(route(&req(
                "PATCH",
                "/devices/net0",
                r#"{"rate_limiter":{"rx":{},"ops":{}}}"#
            ))),
            Some(400)
        );
        assert_eq!(status(route(&req("PATCH", "/devices/", "{}"))), Some(404));
        assert_eq!(status(route(&req("GET", "/devices/x", ""))), Some(405));
        assert_eq!(status(route(&req("GET", "/vm/actions/x", ""))), Some(404));
        assert_eq!(status(route(&req("PUT", "/vm/actions", "[]"))), Some(400));
        let long = format!("/{}", "é".repeat(10_000));
        let Err(answer) = route(&req("GET", &long, "")) else {
            panic!("a route for {long}");
        };
        assert!(
            answer.body.len() < 1000,
            "the error quotes at most 200 characters"
        );
    }
}
