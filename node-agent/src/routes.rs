//! A router that knows what it serves: routes are added one method and path at a time, and
//! the list of them is kept beside the router, so a test can compare what a router serves
//! with what the OpenAPI document says (tests/api.rs).

use axum::handler::Handler;
use axum::http::Method;
use axum::routing::{self, MethodRouter};
use axum::Router;

pub struct Routes<S = ()> {
    router: Router<S>,
    served: Vec<(Method, String)>,
}

impl<S: Clone + Send + Sync + 'static> Default for Routes<S> {
    fn default() -> Self {
        Self {
            router: Router::new(),
            served: Vec::new(),
        }
    }
}

impl<S: Clone + Send + Sync + 'static> Routes<S> {
    pub fn new() -> Self {
        Self::default()
    }

    fn add(mut self, method: Method, path: &str, route: MethodRouter<S>) -> Self {
        self.served.push((method, path.to_string()));
        // A second method on a path joins the first one's method router.
        self.router = self.router.route(path, route);
        self
    }

    pub fn get<H: Handler<T, S>, T: 'static>(self, path: &str, handler: H) -> Self {
        self.add(Method::GET, path, routing::get(handler))
    }

    pub fn post<H: Handler<T, S>, T: 'static>(self, path: &str, handler: H) -> Self {
        self.add(Method::POST, path, routing::post(handler))
    }

    pub fn put<H: Handler<T, S>, T: 'static>(self, path: &str, handler: H) -> Self {
        self.add(Method::PUT, path, routing::put(handler))
    }

    pub fn delete<H: Handler<T, S>, T: 'static>(self, path: &str, handler: H) -> Self {
        self.add(Method::DELETE, path, routing::delete(handler))
    }

    /// Applies layers or a fallback (not routes: those go through the methods above).
    pub fn map(mut self, f: impl FnOnce(Router<S>) -> Router<S>) -> Self {
        self.router = f(self.router);
        self
    }

    pub fn with_state<S2>(self, state: S) -> Routes<S2> {
        Routes {
            router: self.router.with_state(state),
            served: self.served,
        }
    }

    /// The routes served: method and path (axum's `{param}` syntax).
    pub fn served(&self) -> &[(Method, String)] {
        &self.served
    }

    pub fn into_router(self) -> Router<S> {
        self.router
    }
}

impl Routes<()> {
    /// Serves `inner`'s routes under `prefix`.
    pub fn nest(mut self, prefix: &str, inner: Routes<()>) -> Self {
        self.served.extend(
            inner
                .served
                .into_iter()
                .map(|(m, p)| (m, format!("{prefix}{p}"))),
        );
        self.router = self.router.nest(prefix, inner.router);
        self
    }
}
