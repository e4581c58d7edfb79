//! AUTH (RFC 4954) on [`common::sasl`]: `334` challenges in base64, `*` cancels, initial
//! responses (`=` for an empty one), SCRAM's final server data as one more `334`. A failure
//! waits the throttle's growing delay, the same for unknown users and wrong passwords.

use base64::Engine as _;
use common::sasl::{Exchange, Failure, Mechanism, Step};
use common::smtp::Reply;
use common::smtp::server::Connection;
use smtp_proto::{AUTH_LOGIN, AUTH_PLAIN, AUTH_SCRAM_SHA_256};

use super::{Flow, Session, State, written};

/// What a client line in an exchange means.
enum Answer {
    Data(Vec<u8>),
    Cancel,
    Malformed,
}

fn decode(line: &str) -> Answer {
    let line = line.trim_end();
    if line == "*" {
        return Answer::Cancel;
    }
    if line.is_empty() || line == "=" {
        return Answer::Data(Vec::new());
    }
    match base64::engine::general_purpose::STANDARD.decode(line) {
        Ok(b) => Answer::Data(b),
        Err(_) => Answer::Malformed,
    }
}

impl Session {
    pub(crate) async fn handle_auth(
        &mut self,
        conn: &mut Connection,
        state: State,
        mechanism: u64,
        initial_response: String,
    ) -> (State, Reply, Flow) {
        let refuse = |state, reply| (state, reply, Flow::Continue);
        if self.user.is_some() {
            return refuse(state, Reply::perm(503, "5.5.1", "already authenticated"));
        }
        match state {
            State::Greeted(_) => {}
            State::Connected => {
                return refuse(state, Reply::perm(503, "5.5.1", "send EHLO first"));
            }
            State::Mail { .. } => {
                return refuse(
                    state,
                    Reply::perm(503, "5.5.1", "AUTH is not allowed during a transaction"),
                );
            }
        }
        if !self.auth_allowed(conn) {
            return refuse(
                state,
                Reply::perm(
                    538,
                    "5.7.11",
                    "encryption required for requested authentication mechanism",
                ),
            );
        }
        let mechanism = match mechanism {
            AUTH_PLAIN => Mechanism::Plain,
            AUTH_LOGIN => Mechanism::Login,
            AUTH_SCRAM_SHA_256 => Mechanism::ScramSha256,
            _ => {
                return refuse(
                    state,
                    Reply::perm(504, "5.5.4", "unrecognized authentication type"),
                );
            }
        };
        let mut exchange = match self.relay.verifier.start(mechanism) {
            Ok(x) => x,
            Err(e) => {
                tracing::error!(error = %e, "cannot start a sasl exchange");
                return refuse(
                    state,
                    Reply::temp(454, "4.7.0", "temporary authentication failure"),
                );
            }
        };
        let initial = if initial_response.is_empty() {
            None
        } else {
            match decode(&initial_response) {
                Answer::Data(d) => Some(d),
                Answer::Cancel | Answer::Malformed => {
                    return refuse(
                        state,
                        Reply::perm(501, "5.5.2", "cannot decode the initial response"),
                    );
                }
            }
        };
        let mut step = exchange.begin(initial.as_deref()).await;
        loop {
            match step {
                Step::Challenge(c) => {
                    let text = base64::engine::general_purpose::STANDARD.encode(c);
                    match self.challenge(conn, &text).await {
                        Ok(Answer::Data(d)) => step = exchange.step(&d).await,
                        Ok(Answer::Cancel) => {
                            return refuse(
                                state,
                                Reply::perm(501, "5.0.0", "authentication cancelled"),
                            );
                        }
                        Ok(Answer::Malformed) => {
                            return refuse(
                                state,
                                Reply::perm(501, "5.5.2", "cannot decode the response"),
                            );
                        }
                        Err(flow) => return (state, written(), flow),
                    }
                }
                Step::Success {
                    address,
                    final_data,
                } => {
                    if let Some(data) = final_data {
                        let text = base64::engine::general_purpose::STANDARD.encode(data);
                        match self.challenge(conn, &text).await {
                            Ok(Answer::Data(_)) => {}
                            Ok(Answer::Cancel | Answer::Malformed) => {
                                return refuse(
                                    state,
                                    Reply::perm(501, "5.0.0", "authentication cancelled"),
                                );
                            }
                            Err(flow) => return (state, written(), flow),
                        }
                    }
                    common::obs::auth("relay", "success");
                    self.relay.throttle.succeeded(&address);
                    tracing::info!(user = %address, mechanism = mechanism.as_str(), "authenticated");
                    tracing::Span::current().record("user", address.as_str());
                    self.user = Some(address);
                    return (
                        state,
                        Reply::ok(235, "2.7.0", "authentication successful"),
                        Flow::Continue,
                    );
                }
                Step::Failure(Failure::Unavailable) => {
                    common::obs::auth("relay", "unavailable");
                    return refuse(
                        state,
                        Reply::temp(454, "4.7.0", "temporary authentication failure"),
                    );
                }
                Step::Failure(Failure::Rejected | Failure::Malformed) => {
                    common::obs::auth("relay", "failure");
                    let ip = conn.peer().ip();
                    return self.failed(state, &exchange, ip).await;
                }
            }
        }
    }

    /// Sends a `334` challenge and reads the answer; `Err` when the connection is gone.
    async fn challenge(&mut self, conn: &mut Connection, text: &str) -> Result<Answer, Flow> {
        conn.reply(&Reply::ok(334, "", text));
        match conn.read_line().await {
            Ok(line) => Ok(decode(&line)),
            Err(e) => {
                if let Some(r) = e.reply() {
                    conn.reply(&r);
                }
                Err(if e.is_fatal() {
                    Flow::Close
                } else {
                    Flow::Continue
                })
            }
        }
    }

    /// A failed login: the growing delay, the same answer for every cause, and the end of the
    /// connection after too many.
    async fn failed(
        &mut self,
        state: State,
        exchange: &Exchange,
        ip: std::net::IpAddr,
    ) -> (State, Reply, Flow) {
        let claimed = exchange.claimed_user().map(str::to_owned);
        let delay = self.relay.throttle.failed(ip, claimed.as_deref());
        tracing::info!(
            user = claimed.as_deref().unwrap_or(""),
            ?delay,
            "authentication failed"
        );
        tokio::time::sleep(delay).await;
        self.auth_failures += 1;
        if self.auth_failures >= self.relay.settings.max_auth_failures {
            return (
                state,
                Reply::temp(421, "4.7.0", "too many failed authentications"),
                Flow::Close,
            );
        }
        (
            state,
            Reply::perm(535, "5.7.8", "authentication credentials invalid"),
            Flow::Continue,
        )
    }
}
