//! The admin HTTP listener of a `mailctl up` process: `/metrics` (Prometheus text format),
//! `/trace?q=` (this process's trace events about a queue id, Message-ID or address, JSON),
//! `/api/status` (JSON) and `/` (the status page: server-rendered HTML, no external resources,
//! so it works without any network at view time).
//!
//! There is no authentication: the listener belongs on loopback or a management network.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use common::location::Directory;
use common::obs::{self, Minute, TraceEvent};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::config::PlatformSettings;
use crate::runfile;

/// The process's metrics recorder, installed once (the first platform started in a process).
pub fn recorder() -> Option<&'static PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let built = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), obs::LATENCY_BUCKETS)
                .and_then(|b| b.install_recorder());
            match built {
                Ok(h) => Some(h),
                Err(e) => {
                    tracing::warn!(error = %e, "no metrics recorder");
                    None
                }
            }
        })
        .as_ref()
}

/// What the handlers need.
pub struct Web {
    /// The platform's settings (queues, data directory).
    pub settings: PlatformSettings,
    /// The location database.
    pub directory: Arc<dyn Directory>,
    /// The roles of this process.
    pub roles: Vec<String>,
}

/// Serves the admin listener until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    web: Arc<Web>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = axum::Router::new()
        .route("/", get(page))
        .route("/metrics", get(metrics))
        .route("/trace", get(trace))
        .route("/api/status", get(status))
        .with_state(web);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

#[derive(Deserialize)]
struct TraceQuery {
    q: String,
    #[serde(default)]
    limit: Option<usize>,
}

/// One process's answer to `/trace`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TraceAnswer {
    /// The roles of the answering process.
    pub roles: Vec<String>,
    /// Its events about the query, oldest first.
    pub events: Vec<TraceEvent>,
}

async fn trace(State(web): State<Arc<Web>>, Query(q): Query<TraceQuery>) -> Response {
    let limit = q.limit.unwrap_or(1000).min(obs::TRACE_CAPACITY);
    axum::Json(TraceAnswer {
        roles: web.roles.clone(),
        events: obs::find(&q.q, limit),
    })
    .into_response()
}

async fn metrics(State(web): State<Arc<Web>>) -> Response {
    let Some(handle) = recorder() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "no metrics recorder\n").into_response();
    };
    // Gauges that are read when asked rather than kept up to date.
    for q in queues(&web.settings).await {
        metrics::gauge!("mail_queue_messages", "queue" => q.name).set(q.messages as f64);
        metrics::gauge!("mail_queue_oldest_seconds", "queue" => q.name).set(q.oldest_s as f64);
    }
    if let Ok(filers) = web.directory.filers().await {
        for f in filers {
            metrics::gauge!("mail_filer_mailboxes", "filer" => f.filer.name.clone())
                .set(f.mailboxes as f64);
        }
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        handle.render(),
    )
        .into_response()
}

/// A queue's size and age.
#[derive(Debug, Clone, Serialize)]
pub struct QueueInfo {
    /// `spool` or `relay`.
    pub name: &'static str,
    /// Entries in it.
    pub messages: usize,
    /// Age of the oldest entry, in seconds (0 when empty).
    pub oldest_s: u64,
}

async fn queues(settings: &PlatformSettings) -> Vec<QueueInfo> {
    let settings = settings.clone();
    tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        let Ok(all) = crate::queue::open_all(&settings) else {
            return out;
        };
        let now = obs::now_ms();
        for (name, q) in all {
            if let Ok(entries) = q.list() {
                let oldest = entries.iter().map(|e| e.queued_ms).min().unwrap_or(now);
                out.push(QueueInfo {
                    name,
                    messages: entries.len(),
                    oldest_s: now.saturating_sub(oldest) / 1000,
                });
            }
        }
        out
    })
    .await
    .unwrap_or_default()
}

/// The status page's data.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Every `mailctl up` on this data directory, its roles and listeners, reachable or not.
    pub processes: Vec<ProcessInfo>,
    /// Filers with their state and mailbox counts.
    pub filers: Vec<common::location::FilerUsage>,
    /// The queues of this host.
    pub queues: Vec<QueueInfo>,
    /// The latest deliveries and refusals this process saw, newest first.
    pub recent: Vec<TraceEvent>,
    /// Messages per minute, the last hour, oldest first.
    pub minutes: Vec<Minute>,
}

/// One process with its listeners.
#[derive(Debug, Clone, Serialize)]
pub struct ProcessInfo {
    /// Its process id.
    pub pid: u32,
    /// Its roles.
    pub roles: Vec<String>,
    /// (service, protocol, address, reachable).
    pub listeners: Vec<(String, String, String, bool)>,
}

async fn collect(web: &Web) -> Status {
    let mut processes = Vec::new();
    let infos = runfile::read_alive(&web.settings.shared.data_dir).unwrap_or_default();
    for i in infos {
        let mut listeners = Vec::new();
        for l in &i.listeners {
            let reachable = match l.address.parse::<SocketAddr>() {
                Ok(a) => matches!(
                    tokio::time::timeout(
                        std::time::Duration::from_millis(500),
                        tokio::net::TcpStream::connect(a)
                    )
                    .await,
                    Ok(Ok(_))
                ),
                Err(_) => false,
            };
            listeners.push((
                l.service.clone(),
                l.protocol.clone(),
                l.address.clone(),
                reachable,
            ));
        }
        processes.push(ProcessInfo {
            pid: i.pid,
            roles: i.roles.clone(),
            listeners,
        });
    }
    Status {
        processes,
        filers: web.directory.filers().await.unwrap_or_default(),
        queues: queues(&web.settings).await,
        recent: obs::recent(&["stored", "delivered", "refused", "bounced"], 25),
        minutes: obs::minutes(),
    }
}

async fn status(State(web): State<Arc<Web>>) -> Response {
    axum::Json(collect(&web).await).into_response()
}

fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn time_of(ms: u64) -> String {
    let s = ms / 1000;
    format!("{:02}:{:02}:{:02}", (s / 3600) % 24, (s / 60) % 60, s % 60)
}

/// The bar chart of messages per minute, as inline SVG.
fn chart(minutes: &[Minute]) -> String {
    let now = obs::now_ms() / 60_000;
    let (w, h, n) = (600u64, 120u64, obs::MINUTES as u64);
    let max = minutes
        .iter()
        .filter(|m| {
            now.checked_sub(m.minute)
                .is_some_and(|a| a < obs::MINUTES as u64)
        })
        .map(|m| m.received.max(m.delivered))
        .max()
        .unwrap_or(0)
        .max(1);
    let bar = w / n;
    let mut svg = format!(
        "<svg class=\"chart\" width=\"{w}\" height=\"{}\" viewBox=\"0 0 {w} {}\" role=\"img\" aria-label=\"messages per minute\">",
        h + 16,
        h + 16
    );
    for m in minutes {
        let Some(age) = now.checked_sub(m.minute).filter(|a| *a < n) else {
            continue;
        };
        let x = (n - 1 - age) * bar;
        for (i, (v, class)) in [(m.received, "received"), (m.delivered, "delivered")]
            .into_iter()
            .enumerate()
        {
            let bh = v * h / max;
            let _ = write!(
                svg,
                "<rect class=\"{class}\" x=\"{}\" y=\"{}\" width=\"{}\" height=\"{bh}\"><title>{} {class}: {v}</title></rect>",
                x + i as u64 * (bar / 2),
                h - bh,
                (bar / 2).max(1),
                time_of(m.minute * 60_000),
            );
        }
    }
    let _ = write!(
        svg,
        "<text x=\"0\" y=\"{}\">-60 min</text><text x=\"{}\" y=\"{}\" text-anchor=\"end\">now (max {max}/min)</text></svg>",
        h + 14,
        w,
        h + 14
    );
    svg
}

async fn page(State(web): State<Arc<Web>>) -> Html<String> {
    let s = collect(&web).await;
    let mut o = String::from(
        "<!doctype html><html><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"10\">\
         <title>Mail platform status</title><style>\
         body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.5em}\
         table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}\
         .ok{color:#17702c}.bad{color:#b00020;font-weight:bold}.chart rect.received{fill:#7aa6d8}\
         .chart rect.delivered{fill:#2e7d32}.chart text{font-size:10px;fill:#555}</style></head><body>\
         <h1>Mail platform status</h1>",
    );
    let _ = write!(
        o,
        "<p>This process: roles {}; refreshed every 10 s.</p>",
        esc(&web.roles.join(", "))
    );
    o.push_str("<h2>Filers</h2><table id=\"filers\"><tr><th>filer</th><th>state</th><th>weight</th><th>mailboxes</th><th>LMTP</th></tr>");
    for f in &s.filers {
        let state = f.filer.state.to_string();
        let _ = write!(
            o,
            "<tr><td>{}</td><td class=\"{}\">{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&f.filer.name),
            if state == "up" { "ok" } else { "bad" },
            esc(&state),
            f.filer.weight,
            f.mailboxes,
            esc(&f.filer.lmtp)
        );
    }
    o.push_str("</table><h2>Queues</h2><table id=\"queues\"><tr><th>queue</th><th>messages</th><th>oldest</th></tr>");
    for q in &s.queues {
        let _ = write!(
            o,
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            q.name,
            q.messages,
            if q.messages == 0 {
                "-".to_owned()
            } else {
                format!("{} s", q.oldest_s)
            }
        );
    }
    let _ = write!(
        o,
        "</table><h2>Messages per minute</h2>{}<p><span style=\"color:#7aa6d8\">■</span> received \
         <span style=\"color:#2e7d32\">■</span> delivered</p>",
        chart(&s.minutes)
    );
    o.push_str("<h2>Last deliveries and refusals</h2><table id=\"recent\"><tr><th>time (UTC)</th><th>service</th><th>event</th><th>from</th><th>to</th><th>Message-ID</th><th>result</th></tr>");
    for e in &s.recent {
        let _ = write!(
            o,
            "<tr><td>{}</td><td>{}</td><td class=\"{}\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            time_of(e.at_us / 1000),
            esc(&e.service),
            if matches!(e.event.as_str(), "refused" | "bounced") {
                "bad"
            } else {
                "ok"
            },
            esc(&e.event),
            esc(&e.from),
            esc(&e.to.join(", ")),
            esc(e.message_id.as_deref().unwrap_or("")),
            esc(&e.result)
        );
    }
    o.push_str("</table><h2>Services</h2><table id=\"services\"><tr><th>process</th><th>service</th><th>protocol</th><th>address</th><th>health</th></tr>");
    for p in &s.processes {
        for (service, protocol, address, up) in &p.listeners {
            let _ = write!(
                o,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"{}\">{}</td></tr>",
                p.pid,
                esc(service),
                esc(protocol),
                esc(address),
                if *up { "ok" } else { "bad" },
                if *up { "up" } else { "NOT REACHABLE" }
            );
        }
    }
    o.push_str("</table><p><a href=\"/metrics\">/metrics</a> · <a href=\"/api/status\">/api/status</a> · trace: <code>mailctl trace QUEUE-ID|MESSAGE-ID|ADDRESS</code></p></body></html>");
    Html(o)
}

/// `mailctl trace`: asks every admin listener (the processes on this data directory, from their
/// run files, and `[admin] peers`) about `q`, then about every Message-ID and queue id found,
/// so the hops that only know one of them are found too. The events, oldest first, without
/// repeats; and the listeners that did not answer.
pub async fn trace_everywhere(
    settings: &PlatformSettings,
    q: &str,
) -> (Vec<TraceEvent>, Vec<(SocketAddr, String)>) {
    let mut targets: Vec<SocketAddr> = runfile::read_alive(&settings.shared.data_dir)
        .unwrap_or_default()
        .iter()
        .flat_map(|i| i.listeners.iter())
        .filter(|l| l.service == "admin")
        .filter_map(|l| l.address.parse().ok())
        .collect();
    targets.extend(settings.admin.peers.iter().copied());
    targets.sort();
    targets.dedup();
    let mut failed = Vec::new();
    let mut events: Vec<TraceEvent> = Vec::new();
    let mut asked: Vec<String> = Vec::new();
    let mut todo = vec![q.trim().to_owned()];
    // The query, then the ids it led to (bounded: an address can match many messages).
    while let Some(q) = todo.pop() {
        if asked.contains(&q) || asked.len() >= 50 {
            continue;
        }
        asked.push(q.clone());
        for t in &targets {
            match ask(*t, &q).await {
                Ok(answer) => {
                    for e in answer.events {
                        for id in e.message_id.iter().chain(e.queue_id.iter()) {
                            if !asked.contains(id) && !todo.contains(id) {
                                todo.push(id.clone());
                            }
                        }
                        if !events.contains(&e) {
                            events.push(e);
                        }
                    }
                }
                Err(e) => {
                    if !failed.iter().any(|(a, _)| a == t) {
                        failed.push((*t, e));
                    }
                }
            }
        }
    }
    events.sort_by_key(|e| e.at_us);
    (events, failed)
}

/// One `GET /trace?q=` (HTTP/1.0: the answer ends with the connection), bounded in time and size.
async fn ask(addr: SocketAddr, q: &str) -> Result<TraceAnswer, String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    const MAX: u64 = 64 << 20;
    let run = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let req = format!(
            "GET /trace?q={} HTTP/1.0\r\nHost: {addr}\r\n\r\n",
            percent_encode(q)
        );
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        s.take(MAX)
            .read_to_end(&mut buf)
            .await
            .map_err(|e| e.to_string())?;
        let split = buf
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or("no HTTP header end")?;
        let head = String::from_utf8_lossy(&buf[..split]);
        if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
            return Err(head.lines().next().unwrap_or("").to_owned());
        }
        serde_json::from_slice(&buf[split + 4..]).map_err(|e| e.to_string())
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), run)
        .await
        .map_err(|_| "timed out".to_owned())?
}

/// Percent-encoding of a query value (RFC 3986 unreserved characters stay).
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// The path of each message as text: grouped by Message-ID (or queue id), one line per event.
pub fn format_trace(events: &[TraceEvent]) -> String {
    let mut groups: Vec<(String, Vec<&TraceEvent>)> = Vec::new();
    for e in events {
        let key = e
            .message_id
            .as_ref()
            .map(|m| format!("<{m}>"))
            .or_else(|| e.queue_id.clone())
            .unwrap_or_else(|| "(no id)".to_owned());
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => v.push(e),
            None => groups.push((key, vec![e])),
        }
    }
    let mut out = String::new();
    for (key, evs) in groups {
        let _ = writeln!(out, "{key}");
        for e in evs {
            let ms = (e.at_us / 1000) % 1000;
            let _ = write!(
                out,
                "  {}.{ms:03}  {:<8} {:<9} {:<14} {} -> {}",
                time_of(e.at_us / 1000),
                e.service,
                e.event,
                e.queue_id.as_deref().unwrap_or("-"),
                if e.from.is_empty() { "<>" } else { &e.from },
                e.to.join(",")
            );
            if !e.peer.is_empty() {
                let _ = write!(out, " [{}]", e.peer);
            }
            if let Some(d) = e.duration_ms {
                let _ = write!(out, " {d} ms");
            }
            let _ = writeln!(out, ": {}", e.result);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_percent_encoded() {
        assert_eq!(percent_encode("<a b@c.d>&x=1"), "%3Ca%20b%40c.d%3E%26x%3D1");
    }

    #[test]
    fn a_trace_is_grouped_by_message() {
        let e = |at_us, service: &str, event: &str, mid: Option<&str>| TraceEvent {
            at_us,
            service: service.into(),
            event: event.into(),
            message_id: mid.map(str::to_owned),
            from: "a@x".into(),
            to: vec!["b@y".into()],
            result: "ok".into(),
            ..TraceEvent::default()
        };
        let text = format_trace(&[
            e(1_000, "spool", "received", Some("m1@x")),
            e(2_000, "spool", "received", None),
            e(3_000, "filer1", "stored", Some("m1@x")),
        ]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "<m1@x>");
        assert!(lines[1].contains("spool") && lines[1].contains("received"));
        assert!(lines[2].contains("filer1") && lines[2].contains("stored"));
        assert_eq!(lines[3], "(no id)");
    }

    #[test]
    fn html_is_escaped() {
        assert_eq!(
            esc("<a href=\"x\">'&"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;"
        );
    }

    #[test]
    fn the_chart_has_a_bar_per_minute_and_kind() {
        let now = obs::now_ms() / 60_000;
        let svg = chart(&[
            Minute {
                minute: now - 1,
                received: 4,
                delivered: 2,
                refused: 0,
            },
            Minute {
                minute: now - 100,
                received: 9,
                delivered: 9,
                refused: 0,
            },
        ]);
        assert_eq!(svg.matches("<rect").count(), 2, "{svg}");
        assert!(svg.contains("received: 4") && svg.contains("delivered: 2"));
        assert!(
            svg.contains("max 4/min"),
            "an hour-old minute is left out: {svg}"
        );
    }
}
