//! `llm-tower-proxy usage`: cost and tokens per task type, tenant and model over a window,
//! read from the running gateway's `/status`, printed as tables or JSON.
//!
//! The gateway is found from the configuration file: `server.metrics_listen` if `/status`
//! is served there, else `server.listen`; the token, if `server.metrics_token_env` names
//! one, is read from that variable. `--url` overrides the address.

use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::Config;

/// Largest `/status` answer read.
const MAX_ANSWER: u64 = 16 * 1024 * 1024;
/// How long the whole exchange may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Runs the command; prints to stdout, errors to stderr.
pub async fn run(config: &Path, url: Option<&str>, window: u32, json: bool) -> ExitCode {
    match fetch(config, url, window).await {
        Ok(status) => {
            let activity = status.get("activity").cloned().unwrap_or(Value::Null);
            let out = if json {
                serde_json::to_string_pretty(&activity).unwrap_or_default()
            } else {
                tables(&activity)
            };
            #[allow(clippy::print_stdout)] // the command's output
            {
                println!("{out}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            #[allow(clippy::print_stderr)] // the command's error
            {
                eprintln!("llm-tower-proxy usage: {e}");
            }
            ExitCode::FAILURE
        }
    }
}

/// Where `/status` is and the token for it.
fn target(config: &Path, url: Option<&str>) -> Result<(String, Option<String>), String> {
    let cfg = Config::from_file(config).map_err(|e| e.to_string())?;
    let token = cfg
        .server
        .metrics_token_env
        .as_ref()
        .and_then(|v| std::env::var(v.get_ref()).ok())
        .filter(|t| !t.is_empty());
    let base = match url {
        Some(u) => u.to_owned(),
        None => {
            let addr = match &cfg.server.metrics_listen {
                Some(a) => a.get_ref().clone(),
                None => cfg.listen_addr().to_string(),
            };
            format!("http://{addr}")
        }
    };
    Ok((base, token))
}

async fn fetch(config: &Path, url: Option<&str>, window: u32) -> Result<Value, String> {
    let (base, token) = target(config, url)?;
    let rest = base
        .strip_prefix("http://")
        .ok_or_else(|| format!("only http:// URLs are supported, not {base:?}"))?;
    let host = rest.split('/').next().unwrap_or(rest);
    let path = format!(
        "/status?format=json&window={}",
        window.clamp(1, llm_tower_axum::MINUTES)
    );
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nhost: {host}\r\naccept: application/json\r\nconnection: close\r\n"
    );
    if let Some(t) = &token {
        let _ = write!(req, "authorization: Bearer {t}\r\n");
    }
    req.push_str("\r\n");
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(host)
            .await
            .map_err(|e| format!("cannot connect to {host}: {e}"))?;
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| format!("cannot send to {host}: {e}"))?;
        let mut buf = Vec::new();
        s.take(MAX_ANSWER)
            .read_to_end(&mut buf)
            .await
            .map_err(|e| format!("cannot read from {host}: {e}"))?;
        Ok::<_, String>(buf)
    };
    let buf = tokio::time::timeout(TIMEOUT, exchange)
        .await
        .map_err(|_| format!("{host} did not answer within {TIMEOUT:?}"))??;
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("malformed HTTP answer")?;
    let head = String::from_utf8_lossy(&buf[..split]);
    let body = &buf[split + 4..];
    let status_line = head.lines().next().unwrap_or_default();
    let code = status_line.split_whitespace().nth(1).unwrap_or_default();
    if code != "200" {
        let hint = if code == "401" {
            " (set the variable server.metrics_token_env names)"
        } else if code == "404" {
            " (is /metrics on? `server.metrics = true`; with server.metrics_listen, pass --url)"
        } else {
            ""
        };
        return Err(format!("{base}{path} answered {status_line:?}{hint}"));
    }
    let chunked = head
        .lines()
        .any(|l| l.eq_ignore_ascii_case("transfer-encoding: chunked"));
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_vec()
    };
    serde_json::from_slice(&body).map_err(|e| format!("the answer is not JSON: {e}"))
}

/// Joins the chunks of a chunked HTTP/1.1 body.
fn dechunk(mut b: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let eol = b
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("malformed chunked body")?;
        let size = std::str::from_utf8(&b[..eol])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next()?.trim(), 16).ok())
            .ok_or("malformed chunk size")?;
        b = &b[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        let chunk = b.get(..size).ok_or("truncated chunk")?;
        out.extend_from_slice(chunk);
        b = b.get(size + 2..).ok_or("truncated chunk")?;
    }
}

/// The three tables (task type, tenant, model) of an `activity` object.
pub fn tables(activity: &Value) -> String {
    let mut out = String::new();
    let window = activity
        .get("window_minutes")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let _ = writeln!(out, "last {window} min");
    for (title, key) in [
        ("task type", "by_task"),
        ("tenant", "by_tenant"),
        ("model", "by_model"),
    ] {
        let _ = writeln!(
            out,
            "\n{title:<24} {:>9} {:>7} {:>13} {:>13} {:>14}",
            "requests", "errors", "input tok", "output tok", "cost USD"
        );
        let rows = activity.get(key).and_then(Value::as_object);
        let mut total = [0u64; 5];
        for (name, t) in rows.into_iter().flatten() {
            let n = |k: &str| t.get(k).and_then(Value::as_u64).unwrap_or(0);
            let row = [
                n("requests"),
                n("errors"),
                n("input_tokens"),
                n("output_tokens"),
                n("cost_nano_usd"),
            ];
            for (a, b) in total.iter_mut().zip(row) {
                *a = a.saturating_add(b);
            }
            let _ = writeln!(
                out,
                "{:<24} {:>9} {:>7} {:>13} {:>13} {:>14}",
                name,
                row[0],
                row[1],
                row[2],
                row[3],
                usd(row[4])
            );
        }
        let _ = writeln!(
            out,
            "{:<24} {:>9} {:>7} {:>13} {:>13} {:>14}",
            "total",
            total[0],
            total[1],
            total[2],
            total[3],
            usd(total[4])
        );
    }
    out
}

/// Nano-dollars as dollars with 6 decimals, exactly (integer arithmetic).
fn usd(nano: u64) -> String {
    format!(
        "{}.{:06}",
        nano / 1_000_000_000,
        (nano % 1_000_000_000) / 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_list_every_row_and_a_total() {
        let a = serde_json::json!({
            "window_minutes": 15,
            "by_task": {
                "summarize": {"requests": 3, "errors": 1, "input_tokens": 30, "output_tokens": 12, "cost_nano_usd": 1_234_567_000u64},
                "none": {"requests": 1, "errors": 0, "input_tokens": 5, "output_tokens": 2, "cost_nano_usd": 500}
            },
            "by_tenant": {"acme": {"requests": 4, "errors": 1, "input_tokens": 35, "output_tokens": 14, "cost_nano_usd": 1_234_567_500u64}},
            "by_model": {}
        });
        let t = tables(&a);
        assert!(t.starts_with("last 15 min"), "{t}");
        assert!(t.contains("summarize"), "{t}");
        assert!(t.contains("1.234567"), "{t}");
        let total_line = t.lines().find(|l| l.starts_with("total")).unwrap();
        assert!(total_line.contains(" 4 "), "{total_line}");
        assert_eq!(usd(1_500_000_000), "1.500000");
        assert_eq!(usd(999), "0.000000");
    }

    #[test]
    fn chunked_bodies_are_joined() {
        assert_eq!(
            dechunk(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n").unwrap(),
            b"abcde"
        );
        assert!(dechunk(b"ff\r\nabc").is_err());
        assert!(dechunk(b"zz\r\n").is_err());
    }
}
