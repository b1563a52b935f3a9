//! The replica's HTTP side: an OpenAI-style `POST /v1/completions` (`model` names the namespace) and
//! `GET /ready` for load balancers and Kubernetes probes (200 only once every head is served).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};

use crate::Replica;

/// Largest request body accepted.
const MAX_BODY: usize = 64 * 1024;

fn reply(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("a valid response")
}

fn error(status: StatusCode, kind: &str, message: &str) -> Response<Full<Bytes>> {
    reply(status, json!({ "error": { "message": message, "type": kind } }))
}

fn http_status(code: tonic::Code) -> StatusCode {
    match code {
        tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
        tonic::Code::NotFound => StatusCode::NOT_FOUND,
        tonic::Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        tonic::Code::FailedPrecondition => StatusCode::CONFLICT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

async fn handle(
    replica: Arc<Replica>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/ready") => {
            let ready = replica.status().ready;
            let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
            Ok(reply(status, json!({ "ready": ready })))
        }
        (&Method::POST, "/v1/completions") => {
            let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => {
                    return Ok(error(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", &format!("body: {e}")))
                }
            };
            let v: Value = match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => {
                    return Ok(error(
                        StatusCode::BAD_REQUEST,
                        "invalid_request_error",
                        &format!("body is not JSON: {e}"),
                    ))
                }
            };
            let Some(model) = v.get("model").and_then(Value::as_str) else {
                return Ok(error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    "`model` (the namespace) is required",
                ));
            };
            let Some(prompt) = v.get("prompt").and_then(Value::as_str) else {
                return Ok(error(StatusCode::BAD_REQUEST, "invalid_request_error", "`prompt` must be a string"));
            };
            let max_tokens = v.get("max_tokens").and_then(Value::as_u64).unwrap_or(16).min(u32::MAX as u64) as u32;
            match replica.generate(model, prompt, max_tokens).await {
                Ok(r) => Ok(reply(
                    StatusCode::OK,
                    json!({
                        "object": "text_completion",
                        "created": engram_lineage::now_ms() / 1000,
                        "model": model,
                        "choices": [{ "index": 0, "text": r.text, "finish_reason": if r.tokens >= max_tokens.max(1) { "length" } else { "stop" } }],
                        "usage": { "completion_tokens": r.tokens },
                        // Which weights answered: the version id (empty: the bare base model).
                        "engram_version": r.version,
                    }),
                )),
                Err(s) => Ok(error(http_status(s.code()), "engram_error", s.message())),
            }
        }
        _ => Ok(error(StatusCode::NOT_FOUND, "not_found", "try POST /v1/completions or GET /ready")),
    }
}

/// Serves HTTP on `listener` forever.
pub async fn serve(replica: Arc<Replica>, listener: tokio::net::TcpListener) -> anyhow::Result<()> {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of descriptors or a connection reset before accept: keep serving.
                tracing::warn!("http accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let replica = replica.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle(replica.clone(), req));
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await {
                tracing::debug!("http connection: {e}");
            }
        });
    }
}
