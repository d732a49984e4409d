//! Conversions between the `http` crate's types and [`WhepRequest`] / [`WhepResponse`], for
//! runtimes whose HTTP library speaks `http` (hyper, axum, tower). Types only: reading the body,
//! and the time a client may take for it, stay with the runtime.

use std::net::IpAddr;

use http_types::{Method, StatusCode};

use crate::{WhepRequest, WhepResponse};

impl WhepRequest {
    /// The request of `parts` (method, request target as received, headers) with `body`, or
    /// the response to give when the method is not one the routes know (405).
    ///
    /// The target is the request line's own (path and query, still percent-encoded): routing
    /// never sees the `Host` header or an absolute-form authority. Header values that are not
    /// visible ASCII (or UTF-8) are left out.
    pub fn from_http(
        parts: &http::request::Parts,
        body: Vec<u8>,
        client: Option<IpAddr>,
    ) -> Result<Self, WhepResponse> {
        let Ok(method) = parts.method.as_str().parse::<Method>() else {
            return Err(WhepResponse::new(StatusCode::MethodNotAllowed)
                .with_body("text/plain", "method not allowed\n"));
        };
        let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        let mut req = Self::new(method, target).with_body(body);
        req.client = client;
        for (name, value) in &parts.headers {
            if let Ok(value) = value.to_str() {
                req.headers.push((name.as_str().to_owned(), value.to_owned()));
            }
        }
        Ok(req)
    }
}

impl WhepResponse {
    /// The response as an `http::Response` with the body as it is; header values that cannot
    /// be sent (control characters) are left out.
    pub fn into_http(self) -> http::Response<Vec<u8>> {
        let status = http::StatusCode::from_u16(self.code())
            .unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
        let mut out = http::Response::new(self.body);
        *out.status_mut() = status;
        for (name, value) in self.headers {
            if let Ok(value) = http::HeaderValue::try_from(value) {
                out.headers_mut().append(name, value);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_keeps_the_raw_target_and_headers() {
        let (parts, ()) = http::Request::builder()
            .method("POST")
            .uri("http://evil/metrics?x=1")
            .header("Host", "x/api?")
            .header("X-Bin", &b"\xff"[..])
            .body(())
            .expect("request")
            .into_parts();
        let req = WhepRequest::from_http(&parts, b"v=0".to_vec(), None).expect("known method");
        assert_eq!(req.method, Method::Post);
        assert_eq!(req.target, "/metrics?x=1");
        assert_eq!(req.header("host"), Some("x/api?"));
        assert_eq!(req.header("x-bin"), None);
        assert_eq!(req.body, b"v=0");

        let (parts, ()) =
            http::Request::builder().method("BREW").body(()).expect("request").into_parts();
        let resp = WhepRequest::from_http(&parts, Vec::new(), None).expect_err("unknown method");
        assert_eq!(resp.code(), 405);
    }

    #[test]
    fn response_keeps_status_headers_and_body() {
        let resp = WhepResponse::new(StatusCode::Created)
            .with("Link", "<a>")
            .with("Link", "<b>")
            .with("X-Bad", "a\nb")
            .with_body("application/sdp", "v=0");
        let out = resp.into_http();
        assert_eq!(out.status(), 201);
        assert_eq!(out.headers().get_all("link").iter().count(), 2);
        assert!(out.headers().get("x-bad").is_none());
        assert_eq!(out.body(), b"v=0");
    }
}
