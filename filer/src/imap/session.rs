//! One IMAP session: the I/O driver (read big, write batched), the state machine and the
//! command handlers other than FETCH.
//!
//! Framing uses imap-codec's `Fragmentizer`, which bounds a command's size and never lets
//! literal bytes run as commands; each complete command is decoded with `CommandCodec`. A
//! synchronising literal over the limit is refused before any of it is read (the client waits
//! for our `+`), as RFC 7888 asks.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use common::location::MailboxState;
use common::smtp::server::BoxStream;
use imap_codec::decode::Decoder as _;
use imap_codec::fragmentizer::{DecodeMessageError, FragmentInfo, Fragmentizer};
use imap_codec::{AuthenticateDataCodec, CommandCodec, IdleDoneCodec};
use imap_types::IntoStatic as _;
use imap_types::auth::{AuthMechanism, AuthenticateData};
use imap_types::command::{Command, CommandBody};
use imap_types::core::LiteralMode;
use imap_types::flag::{Flag, StoreResponse, StoreType};
use imap_types::mailbox::{ListMailbox, Mailbox};
use imap_types::sequence::{SeqOrUid, Sequence, SequenceSet};
use imap_types::status::StatusDataItemName;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::{fetch, names, search, wire};
use crate::Filer;
use crate::store::{FlagOp, StoreError, UserStore};

/// RFC 3501 §5.4: the autologout timer is at least 30 minutes once authenticated.
const AUTH_IDLE: Duration = Duration::from_secs(31 * 60);
/// Before login (only the proxy connects, and it logs in at once).
const PRELOGIN_IDLE: Duration = Duration::from_secs(60);
/// Time to log in at all, however the bytes trickle in: the proxy logs in at once, so a
/// session that takes longer is not the proxy's.
const PRELOGIN_LIFETIME: Duration = Duration::from_secs(10);
/// Bad commands before the connection is closed.
const MAX_ERRORS: u32 = 20;
/// Longest command without literals.
const MAX_LINE: u32 = 64 * 1024;
/// Output is written once this much is queued.
pub(super) const WRITE_CHUNK: usize = 256 * 1024;

pub(super) const CAPABILITIES: &str = "IMAP4rev1 SASL-IR LITERAL+ ID ENABLE IDLE NAMESPACE UNSELECT UIDPLUS MOVE CHILDREN SPECIAL-USE QUOTA QUOTA=RES-STORAGE CONDSTORE";

/// A logged-in user.
pub(super) struct User {
    pub(super) store: Arc<UserStore>,
    pub(super) quota: u64,
    /// The mailbox (key form), to check it is still served here.
    pub(super) address: String,
    /// Logged in by a migration (`<proxy principal>+migrate`): allowed while `moving`.
    pub(super) migrator: bool,
}

/// One message as the selected view knows it (sequence number = position + 1).
#[derive(Debug, Clone)]
pub(super) struct Msg {
    pub(super) uid: u32,
    pub(super) flags: String,
    pub(super) modseq: u64,
    pub(super) size: u64,
    pub(super) internal_date: i64,
    pub(super) file: String,
}

/// The selected folder.
pub(super) struct Selected {
    pub(super) folder: String,
    pub(super) read_only: bool,
    pub(super) msgs: Vec<Msg>,
    pub(super) highest_modseq: u64,
    /// UIDs expunged by others that we could not announce yet (during FETCH/STORE/SEARCH).
    pub(super) pending_expunges: Vec<u32>,
}

enum State {
    NotAuthenticated,
    Authenticated(Arc<User>),
    Selected(Arc<User>, Selected),
}

/// What the next complete message from the client is.
enum Mode {
    Command,
    Authenticate { tag: String },
    Idle { tag: String },
}

pub(super) struct Session {
    pub(super) filer: Arc<Filer>,
    stream: BoxStream,
    frag: Fragmentizer,
    pub(super) out: Vec<u8>,
    state: State,
    mode: Mode,
    errors: u32,
    /// CONDSTORE was enabled (ENABLE, SELECT (CONDSTORE) or a command using modseqs).
    pub(super) condstore: bool,
    changes: Option<broadcast::Receiver<String>>,
    close: bool,
    peer: std::net::SocketAddr,
    /// Bytes received since the last complete fragment, and how many the next fragment may
    /// take (a line, or an accepted literal).
    pending: u64,
    allowance: u64,
}

/// Runs one IMAP session to its end.
pub(crate) async fn run(
    filer: Arc<Filer>,
    stream: BoxStream,
    peer: std::net::SocketAddr,
    shutdown: CancellationToken,
) {
    let max = u32::try_from(filer.settings.max_message_size.bytes()).unwrap_or(u32::MAX - MAX_LINE)
        + MAX_LINE;
    let mut s = Session {
        filer,
        stream,
        frag: Fragmentizer::new(max),
        out: Vec::with_capacity(64 * 1024),
        state: State::NotAuthenticated,
        mode: Mode::Command,
        errors: 0,
        condstore: false,
        changes: None,
        close: false,
        peer,
        pending: 0,
        allowance: u64::from(MAX_LINE),
    };
    s.line(&format!(
        "* OK [CAPABILITY {CAPABILITIES} AUTH=PLAIN] filer ready"
    ));
    if let Err(e) = s.drive(shutdown).await {
        tracing::debug!(error = %e, "imap session ended");
    }
}

impl Session {
    pub(super) fn line(&mut self, text: &str) {
        self.out.extend_from_slice(text.as_bytes());
        self.out.extend_from_slice(b"\r\n");
    }

    pub(super) async fn flush(&mut self) -> std::io::Result<()> {
        if !self.out.is_empty() {
            tokio::time::timeout(AUTH_IDLE, self.stream.write_all(&self.out))
                .await
                .map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "write timed out")
                })??;
            self.out.clear();
        }
        Ok(())
    }

    async fn drive(&mut self, shutdown: CancellationToken) -> std::io::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        let login_by = tokio::time::Instant::now() + PRELOGIN_LIFETIME;
        let mut watch = tokio::time::interval(crate::residency_check(&self.filer.settings));
        watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // 1. Handle every complete message already received.
            while let Some(info) = self.frag.progress() {
                // Bytes may arrive for the next fragment: a line, or the announced literal.
                self.pending = 0;
                self.allowance = u64::from(MAX_LINE);
                if let FragmentInfo::Line {
                    announcement: Some(a),
                    ..
                } = info
                {
                    self.allowance += u64::from(a.length);
                    self.on_literal_announced(a.length, a.mode);
                }
                if self.frag.is_message_complete() {
                    self.on_message().await;
                    if self.close {
                        self.flush().await?;
                        return Ok(());
                    }
                }
                if self.out.len() >= WRITE_CHUNK {
                    self.flush().await?;
                }
            }
            // 2. One write for everything queued.
            self.flush().await?;
            // 3. Wait for the client, a change to announce while idling, or shutdown.
            let prelogin = matches!(self.state, State::NotAuthenticated);
            let idle = if prelogin {
                PRELOGIN_IDLE.min(login_by.saturating_duration_since(tokio::time::Instant::now()))
            } else {
                AUTH_IDLE
            };
            let idling = matches!(self.mode, Mode::Idle { .. });
            let resident = self.user().map(|u| (u.address.clone(), u.migrator));
            let changes = self.changes.as_mut();
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    self.line("* BYE [UNAVAILABLE] server shutting down");
                    self.flush().await?;
                    return Ok(());
                }
                r = tokio::time::timeout(idle, self.stream.read(&mut buf)) => match r {
                    Err(_) if prelogin => {
                        self.line("* BYE took too long to log in");
                        self.flush().await?;
                        return Ok(());
                    }
                    Err(_) => {
                        self.line("* BYE autologout: idle for too long");
                        self.flush().await?;
                        return Ok(());
                    }
                    Ok(Ok(0)) => return Ok(()),
                    Ok(Ok(n)) => {
                        // A line (or literal) that never ends must not grow without bound.
                        self.pending += n as u64;
                        if self.pending > self.allowance {
                            self.line("* BYE line too long");
                            self.flush().await?;
                            return Ok(());
                        }
                        self.frag.enqueue_bytes(&buf[..n]);
                    }
                    Ok(Err(e)) => return Err(e),
                },
                changed = recv(changes), if idling => {
                    if changed {
                        self.sync(true).await;
                    }
                }
                _ = watch.tick(), if resident.is_some() => {
                    let (address, migrator) = resident.unwrap_or_default();
                    if let Some(why) = crate::not_served_here(&self.filer, &address, migrator).await {
                        tracing::info!(why, "ending the session");
                        self.line(&format!("* BYE [UNAVAILABLE] {why}"));
                        self.flush().await?;
                        return Ok(());
                    }
                }
            }
        }
    }

    /// A `{n}` at the end of a line: accept (send `+` for a synchronising literal) or refuse.
    fn on_literal_announced(&mut self, length: u32, mode: LiteralMode) {
        let limit = self.filer.settings.max_message_size.bytes();
        if u64::from(length) > limit {
            let tag = self.frag.decode_tag().map(|t| t.inner().to_owned());
            match mode {
                LiteralMode::Sync => {
                    // The client waits for our go-ahead, so nothing of the literal was sent:
                    // the command ends here.
                    let tag = tag.unwrap_or_else(|| "*".to_owned());
                    self.line(&format!(
                        "{tag} NO [TOOBIG] literal larger than {limit} bytes"
                    ));
                    self.frag.skip_message();
                }
                // LITERAL+: the bytes are coming anyway; read and drop them, then refuse.
                LiteralMode::NonSync => self.frag.poison_message(),
            }
        } else if mode == LiteralMode::Sync {
            self.line("+ OK");
        }
    }

    async fn on_message(&mut self) {
        match std::mem::replace(&mut self.mode, Mode::Command) {
            Mode::Command => {
                let decoded = self
                    .frag
                    .decode_message(&CommandCodec::default())
                    .map(|c| c.into_static());
                match decoded {
                    Ok(cmd) => {
                        let tag = cmd.tag.inner().to_owned();
                        tracing::debug!(name = cmd.body.name(), "imap command");
                        self.dispatch(tag, cmd).await;
                    }
                    Err(e) => {
                        let tag = self
                            .frag
                            .decode_tag()
                            .map(|t| t.inner().to_owned())
                            .unwrap_or_else(|| "*".into());
                        let why = match e {
                            DecodeMessageError::MessageTooLong { .. } => "command too long",
                            DecodeMessageError::MessagePoisoned { .. } => "literal too large",
                            _ => "syntax error",
                        };
                        self.line(&format!("{tag} BAD {why}"));
                        self.errors += 1;
                        if self.errors >= MAX_ERRORS {
                            self.line("* BYE too many errors");
                            self.close = true;
                        }
                    }
                }
            }
            Mode::Authenticate { tag } => {
                let data = self.frag.message_bytes().to_vec();
                match AuthenticateDataCodec::default().decode(&data) {
                    Ok((_, AuthenticateData::Continue(r))) => {
                        let r = r.declassify().to_vec();
                        self.finish_login(&tag, &r).await;
                    }
                    Ok((_, AuthenticateData::Cancel)) => {
                        self.line(&format!("{tag} BAD authentication cancelled"))
                    }
                    Err(_) => self.line(&format!("{tag} BAD malformed authentication data")),
                }
            }
            Mode::Idle { tag } => {
                let data = self.frag.message_bytes().to_vec();
                match IdleDoneCodec::default().decode(&data) {
                    Ok(_) => {
                        self.sync(true).await;
                        self.line(&format!("{tag} OK IDLE terminated"));
                    }
                    Err(_) => self.line(&format!("{tag} BAD expected DONE")),
                }
            }
        }
    }

    fn user(&self) -> Option<Arc<User>> {
        match &self.state {
            State::NotAuthenticated => None,
            State::Authenticated(u) | State::Selected(u, _) => Some(u.clone()),
        }
    }

    pub(super) fn selected(&mut self) -> Option<(Arc<User>, &mut Selected)> {
        match &mut self.state {
            State::Selected(u, s) => Some((u.clone(), s)),
            _ => None,
        }
    }

    async fn dispatch(&mut self, tag: String, cmd: Command<'static>) {
        let authenticated = self.user().is_some();
        match cmd.body {
            CommandBody::Capability => {
                let extra = if authenticated { "" } else { " AUTH=PLAIN" };
                self.line(&format!("* CAPABILITY {CAPABILITIES}{extra}"));
                self.ok(&tag, "CAPABILITY completed");
            }
            CommandBody::Noop => {
                self.sync(true).await;
                self.ok(&tag, "completed");
            }
            CommandBody::Logout => {
                self.line("* BYE logging out");
                self.ok(&tag, "LOGOUT completed");
                self.close = true;
            }
            CommandBody::Id { parameters } => {
                // The proxy passes the client's address before it logs in (only proxies reach
                // this port). After login the bytes are the user's, relayed as they are: an ID
                // then could claim any address, so it is not believed.
                if authenticated {
                    tracing::debug!("ignoring ID parameters sent after login");
                } else if let Some(params) = parameters {
                    for (k, v) in params {
                        let k = String::from_utf8_lossy(k.as_ref()).to_ascii_lowercase();
                        if k == "x-originating-ip"
                            && let Some(v) = v.0.as_ref()
                        {
                            let ip = String::from_utf8_lossy(v.as_ref()).into_owned();
                            tracing::info!(client = %ip, proxy = %self.peer, "client address from the proxy");
                        }
                    }
                }
                self.line("* ID (\"name\" \"mail-platform filer\")");
                self.ok(&tag, "ID completed");
            }
            CommandBody::StartTLS => {
                self.line(&format!("{tag} BAD STARTTLS is not offered on the filer"))
            }
            CommandBody::Login { .. } => {
                self.line(&format!("{tag} NO [PRIVACYREQUIRED] LOGIN is not available here; connect through the access proxy"));
            }
            CommandBody::Authenticate {
                mechanism,
                initial_response,
            } => {
                if authenticated {
                    self.line(&format!("{tag} BAD already authenticated"));
                } else if !matches!(mechanism, AuthMechanism::Plain) {
                    self.line(&format!(
                        "{tag} NO [AUTHENTICATIONFAILED] only the proxy's PLAIN login is accepted"
                    ));
                } else if let Some(ir) = initial_response {
                    let ir = ir.declassify().to_vec();
                    self.finish_login(&tag, &ir).await;
                } else {
                    self.line("+ ");
                    self.mode = Mode::Authenticate { tag };
                }
            }
            CommandBody::Enable { capabilities } if authenticated => {
                let mut enabled = Vec::new();
                for c in capabilities.as_ref() {
                    if matches!(
                        c,
                        imap_types::extensions::enable::CapabilityEnable::CondStore
                    ) {
                        self.condstore = true;
                        enabled.push("CONDSTORE");
                    }
                }
                self.line(format!("* ENABLED {}", enabled.join(" ")).trim_end());
                self.ok(&tag, "ENABLE completed");
            }
            CommandBody::Namespace if authenticated => {
                self.line("* NAMESPACE ((\"\" \"/\")) NIL NIL");
                self.ok(&tag, "NAMESPACE completed");
            }
            _ if !authenticated => self.line(&format!("{tag} BAD authenticate first")),
            CommandBody::Select {
                mailbox,
                parameters,
            } => {
                let condstore = !parameters.is_empty();
                self.select(&tag, &mailbox, false, condstore).await;
            }
            CommandBody::Examine {
                mailbox,
                parameters,
            } => {
                let condstore = !parameters.is_empty();
                self.select(&tag, &mailbox, true, condstore).await;
            }
            CommandBody::Create { mailbox } => self.create(&tag, &mailbox).await,
            CommandBody::Delete { mailbox } => self.delete(&tag, &mailbox).await,
            CommandBody::Rename { from, to } => self.rename(&tag, &from, &to).await,
            CommandBody::Subscribe { mailbox } => self.subscribe(&tag, &mailbox, true).await,
            CommandBody::Unsubscribe { mailbox } => self.subscribe(&tag, &mailbox, false).await,
            CommandBody::List {
                reference,
                mailbox_wildcard,
            } => self.list(&tag, &reference, &mailbox_wildcard, false).await,
            CommandBody::Lsub {
                reference,
                mailbox_wildcard,
            } => self.list(&tag, &reference, &mailbox_wildcard, true).await,
            CommandBody::Status {
                mailbox,
                item_names,
            } => self.status(&tag, &mailbox, &item_names).await,
            CommandBody::Append {
                mailbox,
                flags,
                date,
                message,
            } => {
                let data = match message {
                    imap_types::extensions::binary::LiteralOrLiteral8::Literal(l) => {
                        l.data().to_vec()
                    }
                    imap_types::extensions::binary::LiteralOrLiteral8::Literal8(l) => {
                        l.data.to_vec()
                    }
                };
                let date = date.map(|d| d.as_ref().timestamp());
                self.append(&tag, &mailbox, &flags, date, data).await;
            }
            CommandBody::GetQuotaRoot { mailbox } => {
                let name = mailbox_name(&mailbox).unwrap_or_default();
                self.line(&format!(
                    "* QUOTAROOT {} \"\"",
                    quoted(&names::encode(&name))
                ));
                self.quota_line().await;
                self.ok(&tag, "GETQUOTAROOT completed");
            }
            CommandBody::GetQuota { root } => {
                if root.as_ref().is_empty() {
                    self.quota_line().await;
                    self.ok(&tag, "GETQUOTA completed");
                } else {
                    self.line(&format!("{tag} NO no such quota root"));
                }
            }
            CommandBody::SetQuota { .. } => self.line(&format!(
                "{tag} NO [NOPERM] quotas are set by the administrator"
            )),
            CommandBody::Idle => {
                self.line("+ idling");
                self.mode = Mode::Idle { tag };
                self.sync(true).await;
            }
            _ if self.selected().is_none() => {
                self.line(&format!("{tag} BAD select a mailbox first"))
            }
            CommandBody::Check => {
                self.sync(true).await;
                self.ok(&tag, "CHECK completed");
            }
            CommandBody::Close => {
                if let Some((u, sel)) = self.selected()
                    && !sel.read_only
                {
                    let uids: Vec<u32> = sel
                        .msgs
                        .iter()
                        .filter(|m| has_flag(&m.flags, "\\Deleted"))
                        .map(|m| m.uid)
                        .collect();
                    let folder = sel.folder.clone();
                    let _ = blocking(move || u.store.expunge(&folder, &uids)).await;
                }
                self.unselect();
                self.ok(&tag, "CLOSE completed");
            }
            CommandBody::Unselect => {
                self.unselect();
                self.ok(&tag, "UNSELECT completed");
            }
            CommandBody::Expunge => self.expunge(&tag, None).await,
            CommandBody::ExpungeUid { sequence_set } => {
                self.expunge(&tag, Some(&sequence_set)).await
            }
            CommandBody::Search {
                charset,
                criteria,
                uid,
            } => {
                // Search strings are matched as UTF-8 (US-ASCII is a subset).
                let known = charset.as_ref().is_none_or(|c| {
                    let c = c.as_ref().to_ascii_uppercase();
                    c == "UTF-8" || c == "US-ASCII"
                });
                if known {
                    self.search(&tag, &criteria, uid).await;
                } else {
                    self.line(&format!(
                        "{tag} NO [BADCHARSET (UTF-8 US-ASCII)] unsupported charset"
                    ));
                }
            }
            CommandBody::Fetch {
                sequence_set,
                macro_or_item_names,
                uid,
                modifiers,
            } => {
                fetch::fetch(
                    self,
                    &tag,
                    &sequence_set,
                    &macro_or_item_names,
                    uid,
                    &modifiers,
                )
                .await;
            }
            CommandBody::Store {
                sequence_set,
                kind,
                response,
                flags,
                uid,
                modifiers,
            } => {
                let unchanged_since = modifiers
                    .iter()
                    .map(|m| match m {
                        imap_types::command::StoreModifier::UnchangedSince(v) => *v,
                    })
                    .next();
                self.store(
                    &tag,
                    &sequence_set,
                    kind,
                    response,
                    &flags,
                    uid,
                    unchanged_since,
                )
                .await;
            }
            CommandBody::Copy {
                sequence_set,
                mailbox,
                uid,
            } => self.copy(&tag, &sequence_set, &mailbox, uid, false).await,
            CommandBody::Move {
                sequence_set,
                mailbox,
                uid,
            } => self.copy(&tag, &sequence_set, &mailbox, uid, true).await,
            other => self.line(&format!("{tag} BAD {} is not supported", other.name())),
        }
    }

    pub(super) fn ok(&mut self, tag: &str, text: &str) {
        self.line(&format!("{tag} OK {text}"));
    }

    /// Checks the proxy's trusted login (`user\0principal\0secret`) and logs the user in.
    async fn finish_login(&mut self, tag: &str, response: &[u8]) {
        let mut parts = response.split(|&b| b == 0);
        let (Some(authz), Some(authc), Some(secret), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            self.line(&format!(
                "{tag} NO [AUTHENTICATIONFAILED] authentication failed"
            ));
            return;
        };
        let proxy = &self.filer.settings.shared.proxy_principal;
        let migrator = authc == crate::migration_principal(proxy).as_bytes();
        let ok = (authc == proxy.as_bytes() || migrator)
            && crate::constant_time_eq(secret, self.filer.proxy_secret.as_bytes())
            && !authz.is_empty();
        if !ok {
            tracing::warn!("refused an IMAP login that is not the proxy's trusted login");
            self.line(&format!(
                "{tag} NO [AUTHENTICATIONFAILED] authentication failed"
            ));
            self.errors += 3;
            if self.errors >= MAX_ERRORS {
                self.close = true;
            }
            return;
        }
        let address = String::from_utf8_lossy(authz).to_lowercase();
        let mailbox = match self.filer.directory.mailbox(&address).await {
            Ok(Some(m)) => m,
            Ok(None) => {
                self.line(&format!("{tag} NO [AUTHENTICATIONFAILED] no such mailbox"));
                return;
            }
            Err(_) => {
                self.line(&format!(
                    "{tag} NO [UNAVAILABLE] temporary failure, try again later"
                ));
                return;
            }
        };
        // The migration may read the old copy after the flip too (its last sweep).
        if mailbox.filer != self.filer.settings.name && !migrator {
            self.line(&format!(
                "{tag} NO [UNAVAILABLE] mailbox is not on this server"
            ));
            return;
        }
        match mailbox.state {
            MailboxState::Active => {}
            // The migration reads the mailbox while it is held still.
            MailboxState::Moving if migrator => {}
            MailboxState::Moving => {
                self.line(&format!(
                    "{tag} NO [UNAVAILABLE] mailbox is being moved, try again shortly"
                ));
                return;
            }
            MailboxState::Disabled => {
                self.line(&format!("{tag} NO [AUTHENTICATIONFAILED] mailbox disabled"));
                return;
            }
        }
        let store = self.filer.store.clone();
        let (addr, seed) = (mailbox.address.clone(), mailbox.uidvalidity_seed);
        match blocking(move || store.user(&addr, seed)).await {
            Ok(user) => {
                tracing::Span::current().record("user", mailbox.address.as_str());
                tracing::info!("imap login");
                self.changes = Some(user.subscribe());
                self.state = State::Authenticated(Arc::new(User {
                    store: user,
                    quota: mailbox.quota,
                    address: mailbox.address.clone(),
                    migrator,
                }));
                self.line(&format!("{tag} OK [CAPABILITY {CAPABILITIES}] logged in"));
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot open the mailbox");
                self.line(&format!(
                    "{tag} NO [UNAVAILABLE] cannot open the mailbox, try again later"
                ));
            }
        }
    }

    fn unselect(&mut self) {
        if let State::Selected(u, _) = &self.state {
            self.state = State::Authenticated(u.clone());
        }
    }

    async fn select(&mut self, tag: &str, mailbox: &Mailbox<'_>, read_only: bool, condstore: bool) {
        self.unselect();
        let Some(user) = self.user() else { return };
        let name = match mailbox_name(mailbox) {
            Ok(n) => n,
            Err(e) => return self.line(&format!("{tag} NO {}", e.0)),
        };
        if condstore {
            self.condstore = true;
        }
        let store = user.store.clone();
        let n = name.clone();
        let loaded = blocking(move || {
            let f = store
                .folder(&n)?
                .ok_or_else(|| StoreError::NoFolder(n.clone()))?;
            let msgs = store.messages(&n)?;
            Ok::<_, StoreError>((f, msgs))
        })
        .await;
        let (f, msgs) = match loaded {
            Ok(v) => v,
            Err(StoreError::NoFolder(_)) => {
                return self.line(&format!("{tag} NO [NONEXISTENT] no such mailbox"));
            }
            Err(e) => return self.store_error(tag, &e),
        };
        let msgs: Vec<Msg> = msgs
            .into_iter()
            .map(|m| Msg {
                uid: m.uid,
                flags: m.flags,
                modseq: m.modseq,
                size: m.size,
                internal_date: m.internal_date,
                file: m.file,
            })
            .collect();
        let unseen = msgs.iter().position(|m| !has_flag(&m.flags, "\\Seen"));
        self.line("* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft)");
        if read_only {
            self.line("* OK [PERMANENTFLAGS ()] read-only");
        } else {
            self.line("* OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft \\*)] flags permitted");
        }
        self.line(&format!("* {} EXISTS", msgs.len()));
        self.line("* 0 RECENT");
        if let Some(i) = unseen {
            self.line(&format!("* OK [UNSEEN {}] first unseen", i + 1));
        }
        self.line(&format!("* OK [UIDVALIDITY {}] UIDs valid", f.uid_validity));
        self.line(&format!("* OK [UIDNEXT {}] predicted next UID", f.uid_next));
        self.line(&format!(
            "* OK [HIGHESTMODSEQ {}] highest",
            f.highest_modseq.max(1)
        ));
        let code = if read_only { "READ-ONLY" } else { "READ-WRITE" };
        self.line(&format!(
            "{tag} OK [{code}] {} completed",
            if read_only { "EXAMINE" } else { "SELECT" }
        ));
        self.state = State::Selected(
            user,
            Selected {
                folder: name,
                read_only,
                msgs,
                highest_modseq: f.highest_modseq,
                pending_expunges: Vec::new(),
            },
        );
    }

    /// Brings the selected view up to date with the index and announces what changed:
    /// expunges (only when `expunges` is allowed, RFC 3501 §7.4.1), flag changes, new messages.
    pub(super) async fn sync(&mut self, expunges: bool) {
        let condstore = self.condstore;
        let Some((user, sel)) = self.selected() else {
            return;
        };
        let store = user.store.clone();
        let (folder, since) = (sel.folder.clone(), sel.highest_modseq);
        let Ok(changes) = blocking(move || store.changes_since(&folder, since)).await else {
            return;
        };
        let Some((_, sel)) = self.selected() else {
            return;
        };
        let mut lines = Vec::new();
        sel.pending_expunges.extend(changes.expunged);
        if expunges && !sel.pending_expunges.is_empty() {
            let mut gone = std::mem::take(&mut sel.pending_expunges);
            gone.sort_unstable();
            gone.dedup();
            // Highest sequence numbers first, so each announced number is still valid.
            for uid in gone.iter().rev() {
                if let Ok(i) = sel.msgs.binary_search_by_key(uid, |m| m.uid) {
                    sel.msgs.remove(i);
                    lines.push(format!("* {} EXPUNGE", i + 1));
                }
            }
        }
        let before = sel.msgs.len();
        for m in changes.changed {
            match sel.msgs.binary_search_by_key(&m.uid, |v| v.uid) {
                Ok(i) => {
                    if let Some(v) = sel.msgs.get_mut(i) {
                        let flags_changed = v.flags != m.flags;
                        v.modseq = m.modseq;
                        if flags_changed {
                            v.flags = m.flags.clone();
                            let mut l =
                                format!("* {} FETCH (UID {} FLAGS ", i + 1, m.uid).into_bytes();
                            wire::flags(&mut l, &m.flags);
                            if condstore {
                                l.extend_from_slice(format!(" MODSEQ ({})", m.modseq).as_bytes());
                            }
                            l.push(b')');
                            lines.push(String::from_utf8_lossy(&l).into_owned());
                        }
                    }
                }
                Err(_) if sel.msgs.last().is_none_or(|l| l.uid < m.uid) => {
                    sel.msgs.push(Msg {
                        uid: m.uid,
                        flags: m.flags,
                        modseq: m.modseq,
                        size: m.size,
                        internal_date: m.internal_date,
                        file: m.file,
                    });
                }
                Err(_) => {} // a UID below the newest that we never saw: expunged meanwhile
            }
        }
        if sel.msgs.len() != before {
            lines.push(format!("* {} EXISTS", sel.msgs.len()));
        }
        sel.highest_modseq = sel.highest_modseq.max(changes.highest_modseq);
        for l in lines {
            self.line(&l);
        }
    }

    async fn create(&mut self, tag: &str, mailbox: &Mailbox<'_>) {
        let Some(user) = self.user() else { return };
        let name = match mailbox_name(mailbox) {
            Ok(n) if n == "INBOX" => {
                return self.line(&format!("{tag} NO [ALREADYEXISTS] INBOX exists"));
            }
            Ok(n) => n.trim_end_matches(names::DELIMITER).to_owned(),
            Err(e) => return self.line(&format!("{tag} NO {}", e.0)),
        };
        match blocking(move || user.store.create_folder(&name)).await {
            Ok(_) => self.ok(tag, "CREATE completed"),
            Err(StoreError::FolderExists(_)) => {
                self.line(&format!("{tag} NO [ALREADYEXISTS] mailbox exists"))
            }
            Err(e) => self.store_error(tag, &e),
        }
    }

    async fn delete(&mut self, tag: &str, mailbox: &Mailbox<'_>) {
        let Some(user) = self.user() else { return };
        let name = match mailbox_name(mailbox) {
            Ok(n) => n,
            Err(e) => return self.line(&format!("{tag} NO {}", e.0)),
        };
        if self.selected().is_some_and(|(_, s)| s.folder == name) {
            self.unselect();
        }
        match blocking(move || user.store.delete_folder(&name)).await {
            Ok(()) => self.ok(tag, "DELETE completed"),
            Err(StoreError::NoFolder(_)) => {
                self.line(&format!("{tag} NO [NONEXISTENT] no such mailbox"))
            }
            Err(StoreError::NotAllowed(why)) => self.line(&format!("{tag} NO [CANNOT] {why}")),
            Err(e) => self.store_error(tag, &e),
        }
    }

    async fn rename(&mut self, tag: &str, from: &Mailbox<'_>, to: &Mailbox<'_>) {
        let Some(user) = self.user() else { return };
        let (from, to) = match (mailbox_name(from), mailbox_name(to)) {
            (Ok(f), Ok(t)) => (f, t),
            (Err(e), _) | (_, Err(e)) => return self.line(&format!("{tag} NO {}", e.0)),
        };
        if to == "INBOX" {
            return self.line(&format!("{tag} NO [ALREADYEXISTS] INBOX exists"));
        }
        match blocking(move || user.store.rename_folder(&from, &to)).await {
            Ok(()) => self.ok(tag, "RENAME completed"),
            Err(StoreError::NoFolder(_)) => {
                self.line(&format!("{tag} NO [NONEXISTENT] no such mailbox"))
            }
            Err(StoreError::FolderExists(_)) => {
                self.line(&format!("{tag} NO [ALREADYEXISTS] target exists"))
            }
            Err(e) => self.store_error(tag, &e),
        }
    }

    async fn subscribe(&mut self, tag: &str, mailbox: &Mailbox<'_>, on: bool) {
        let Some(user) = self.user() else { return };
        let name = match mailbox_name(mailbox) {
            Ok(n) => n,
            Err(e) => return self.line(&format!("{tag} NO {}", e.0)),
        };
        match blocking(move || user.store.set_subscribed(&name, on)).await {
            Ok(()) => self.ok(
                tag,
                if on {
                    "SUBSCRIBE completed"
                } else {
                    "UNSUBSCRIBE completed"
                },
            ),
            Err(StoreError::NoFolder(_)) => {
                self.line(&format!("{tag} NO [NONEXISTENT] no such mailbox"))
            }
            Err(e) => self.store_error(tag, &e),
        }
    }

    async fn list(
        &mut self,
        tag: &str,
        reference: &Mailbox<'_>,
        pattern: &ListMailbox<'_>,
        lsub: bool,
    ) {
        let Some(user) = self.user() else { return };
        let verb = if lsub { "LSUB" } else { "LIST" };
        let pattern = match pattern {
            ListMailbox::Token(t) => String::from_utf8_lossy(t.as_ref()).into_owned(),
            ListMailbox::String(s) => String::from_utf8_lossy(s.as_ref()).into_owned(),
        };
        let reference = match reference {
            Mailbox::Inbox => "INBOX".to_owned(),
            Mailbox::Other(o) => String::from_utf8_lossy(o.as_ref()).into_owned(),
        };
        if pattern.is_empty() && !lsub {
            // RFC 3501 §6.3.8: the delimiter and root.
            self.line("* LIST (\\Noselect) \"/\" \"\"");
            return self.ok(tag, "LIST completed");
        }
        // Patterns come in modified UTF-7; decode the literal parts the same way as names.
        let full = format!("{reference}{pattern}");
        let full = names::decode_pattern(&full);
        let store = user.store.clone();
        let Ok(folders) = blocking(move || store.folders()).await else {
            return self.line(&format!("{tag} NO [SERVERBUG] cannot list"));
        };
        let all: Vec<&str> = folders.iter().map(|f| f.name.as_str()).collect();
        for f in &folders {
            if lsub && !f.subscribed {
                continue;
            }
            if !names::matches(&full, &f.name) {
                continue;
            }
            let prefix = format!("{}/", f.name);
            let children = all.iter().any(|n| n.starts_with(&prefix));
            let mut attrs = vec![if children {
                "\\HasChildren"
            } else {
                "\\HasNoChildren"
            }];
            if let Some(su) = &f.special_use {
                attrs.push(su);
            }
            let mut l = format!("* {verb} ({}) \"/\" ", attrs.join(" ")).into_bytes();
            wire::string(&mut l, names::encode(&f.name).as_bytes());
            self.line(&String::from_utf8_lossy(&l));
        }
        self.ok(tag, &format!("{verb} completed"));
    }

    async fn status(&mut self, tag: &str, mailbox: &Mailbox<'_>, items: &[StatusDataItemName]) {
        let Some(user) = self.user() else { return };
        let name = match mailbox_name(mailbox) {
            Ok(n) => n,
            Err(e) => return self.line(&format!("{tag} NO {}", e.0)),
        };
        let store = user.store.clone();
        let n = name.clone();
        let r = blocking(move || {
            let f = store
                .folder(&n)?
                .ok_or_else(|| StoreError::NoFolder(n.clone()))?;
            let (messages, unseen) = store.counts(&n)?;
            Ok::<_, StoreError>((f, messages, unseen))
        })
        .await;
        let (f, messages, unseen) = match r {
            Ok(v) => v,
            Err(StoreError::NoFolder(_)) => {
                return self.line(&format!("{tag} NO [NONEXISTENT] no such mailbox"));
            }
            Err(e) => return self.store_error(tag, &e),
        };
        let mut parts = Vec::new();
        for i in items {
            match i {
                StatusDataItemName::Messages => parts.push(format!("MESSAGES {messages}")),
                StatusDataItemName::Recent => parts.push("RECENT 0".to_owned()),
                StatusDataItemName::UidNext => parts.push(format!("UIDNEXT {}", f.uid_next)),
                StatusDataItemName::UidValidity => {
                    parts.push(format!("UIDVALIDITY {}", f.uid_validity))
                }
                StatusDataItemName::Unseen => parts.push(format!("UNSEEN {unseen}")),
                StatusDataItemName::HighestModSeq => {
                    parts.push(format!("HIGHESTMODSEQ {}", f.highest_modseq.max(1)))
                }
                _ => {}
            }
        }
        let mut l = b"* STATUS ".to_vec();
        wire::string(&mut l, names::encode(&name).as_bytes());
        l.extend_from_slice(format!(" ({})", parts.join(" ")).as_bytes());
        self.line(&String::from_utf8_lossy(&l));
        self.ok(tag, "STATUS completed");
    }

    async fn append(
        &mut self,
        tag: &str,
        mailbox: &Mailbox<'_>,
        flags: &[Flag<'_>],
        date: Option<i64>,
        data: Vec<u8>,
    ) {
        let Some(user) = self.user() else { return };
        let name = match mailbox_name(mailbox) {
            Ok(n) => n,
            Err(e) => return self.line(&format!("{tag} NO [TRYCREATE] {}", e.0)),
        };
        if data.is_empty() {
            return self.line(&format!("{tag} NO empty message"));
        }
        let flags = flags
            .iter()
            .map(|f| f.to_string())
            .filter(|f| f != "\\Recent")
            .collect::<Vec<_>>()
            .join(" ");
        let date = date.unwrap_or_else(now);
        let u = user.clone();
        let n = name.clone();
        match blocking(move || u.store.append(&n, &data, &flags, date, u.quota)).await {
            Ok(d) => {
                self.sync(true).await;
                self.line(&format!(
                    "{tag} OK [APPENDUID {} {}] APPEND completed",
                    d.uid_validity, d.uid
                ));
            }
            Err(StoreError::NoFolder(_)) => {
                self.line(&format!("{tag} NO [TRYCREATE] no such mailbox"))
            }
            Err(StoreError::QuotaExceeded { .. }) => {
                self.line(&format!("{tag} NO [OVERQUOTA] quota exceeded"))
            }
            Err(e) => self.store_error(tag, &e),
        }
    }

    async fn quota_line(&mut self) {
        let Some(user) = self.user() else { return };
        let store = user.store.clone();
        let used = blocking(move || store.usage()).await.unwrap_or(0);
        if user.quota > 0 {
            self.line(&format!(
                "* QUOTA \"\" (STORAGE {} {})",
                used / 1024,
                user.quota / 1024
            ));
        } else {
            self.line("* QUOTA \"\" ()");
        }
    }

    async fn expunge(&mut self, tag: &str, only: Option<&SequenceSet>) {
        let Some((user, sel)) = self.selected() else {
            return;
        };
        if sel.read_only {
            return self.line(&format!("{tag} NO [READ-ONLY] mailbox is read-only"));
        }
        let max_uid = sel.msgs.last().map_or(0, |m| m.uid);
        let uids: Vec<u32> = sel
            .msgs
            .iter()
            .filter(|m| has_flag(&m.flags, "\\Deleted"))
            .filter(|m| only.is_none_or(|set| in_set(set, m.uid, max_uid)))
            .map(|m| m.uid)
            .collect();
        let folder = sel.folder.clone();
        match blocking(move || user.store.expunge(&folder, &uids)).await {
            Ok(_) => {
                self.sync(true).await;
                self.ok(tag, "EXPUNGE completed");
            }
            Err(e) => self.store_error(tag, &e),
        }
    }

    async fn search(
        &mut self,
        tag: &str,
        criteria: &imap_types::core::Vec1<imap_types::search::SearchKey<'_>>,
        uid: bool,
    ) {
        let Some((user, sel)) = self.selected() else {
            return;
        };
        let ctx = search::Context {
            max_seq: sel.msgs.len() as u32,
            max_uid: sel.msgs.last().map_or(0, |m| m.uid),
        };
        let and = imap_types::search::SearchKey::And(criteria.clone());
        let needs_content = search::needs_content(&and);
        let msgs = sel.msgs.clone();
        let store = user.store.clone();
        let key = and.into_static();
        let found = blocking(move || {
            let mut hits = Vec::new();
            for (i, m) in msgs.iter().enumerate() {
                let flags: Vec<String> = m
                    .flags
                    .split(' ')
                    .filter(|f| !f.is_empty())
                    .map(str::to_owned)
                    .collect();
                let c = search::Candidate {
                    seq: i as u32 + 1,
                    uid: m.uid,
                    size: m.size,
                    internal_date: m.internal_date,
                    flags: &flags,
                    modseq: m.modseq,
                };
                let path = store.dir().join(&m.file);
                let mut load = || -> Option<Arc<[u8]>> {
                    if !needs_content {
                        return None;
                    }
                    std::fs::read(&path).ok().map(Arc::from)
                };
                if search::matches(&key, &c, &ctx, &mut load) {
                    hits.push(if uid { m.uid } else { i as u32 + 1 });
                }
            }
            Ok::<_, StoreError>(hits)
        })
        .await;
        match found {
            Ok(hits) => {
                let list: Vec<String> = hits.iter().map(u32::to_string).collect();
                let sep = if list.is_empty() { "" } else { " " };
                self.line(&format!("* SEARCH{sep}{}", list.join(" ")));
                self.sync(uid).await;
                self.ok(tag, "SEARCH completed");
            }
            Err(e) => self.store_error(tag, &e),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn store(
        &mut self,
        tag: &str,
        set: &SequenceSet,
        kind: StoreType,
        response: StoreResponse,
        flags: &[Flag<'_>],
        uid: bool,
        unchanged_since: Option<u64>,
    ) {
        if unchanged_since.is_some() {
            self.condstore = true;
        }
        let condstore = self.condstore;
        let Some((user, sel)) = self.selected() else {
            return;
        };
        if sel.read_only {
            return self.line(&format!("{tag} NO [READ-ONLY] mailbox is read-only"));
        }
        let targets = resolve(sel, set, uid);
        let uids: Vec<u32> = targets.iter().map(|&i| sel.msgs[i].uid).collect();
        let op = match kind {
            StoreType::Replace => FlagOp::Replace,
            StoreType::Add => FlagOp::Add,
            StoreType::Remove => FlagOp::Remove,
        };
        let flags: Vec<String> = flags
            .iter()
            .map(|f| f.to_string())
            .filter(|f| f != "\\Recent")
            .collect();
        let folder = sel.folder.clone();
        let r = blocking(move || {
            user.store
                .store_flags(&folder, &uids, op, &flags, unchanged_since)
        })
        .await;
        let (changed, refused) = match r {
            Ok(v) => v,
            Err(e) => return self.store_error(tag, &e),
        };
        let Some((_, sel)) = self.selected() else {
            return;
        };
        let mut lines = Vec::new();
        for m in &changed {
            if let Ok(i) = sel.msgs.binary_search_by_key(&m.uid, |v| v.uid) {
                if let Some(v) = sel.msgs.get_mut(i) {
                    v.flags = m.flags.clone();
                    v.modseq = m.modseq;
                }
                if response == StoreResponse::Answer || unchanged_since.is_some() {
                    let mut l = format!("* {} FETCH (", i + 1).into_bytes();
                    if uid {
                        l.extend_from_slice(format!("UID {} ", m.uid).as_bytes());
                    }
                    l.extend_from_slice(b"FLAGS ");
                    wire::flags(&mut l, &m.flags);
                    if condstore {
                        l.extend_from_slice(format!(" MODSEQ ({})", m.modseq).as_bytes());
                    }
                    l.push(b')');
                    lines.push(String::from_utf8_lossy(&l).into_owned());
                }
            }
        }
        // Messages whose flags were already as asked still get their FETCH (RFC 3501 §6.4.6).
        if response == StoreResponse::Answer {
            for &i in &targets {
                let Some(v) = sel.msgs.get(i) else { continue };
                if changed.iter().any(|c| c.uid == v.uid) || refused.contains(&v.uid) {
                    continue;
                }
                let mut l = format!("* {} FETCH (", i + 1).into_bytes();
                if uid {
                    l.extend_from_slice(format!("UID {} ", v.uid).as_bytes());
                }
                l.extend_from_slice(b"FLAGS ");
                wire::flags(&mut l, &v.flags);
                if condstore {
                    l.extend_from_slice(format!(" MODSEQ ({})", v.modseq).as_bytes());
                }
                l.push(b')');
                lines.push(String::from_utf8_lossy(&l).into_owned());
            }
        }
        let modified = if refused.is_empty() {
            String::new()
        } else {
            let ids: Vec<String> = if uid {
                refused.iter().map(u32::to_string).collect()
            } else {
                refused
                    .iter()
                    .filter_map(|u| sel.msgs.binary_search_by_key(u, |v| v.uid).ok())
                    .map(|i| (i + 1).to_string())
                    .collect()
            };
            format!("[MODIFIED {}] ", ids.join(","))
        };
        for l in lines {
            self.line(&l);
        }
        self.sync(uid).await;
        self.ok(tag, &format!("{modified}STORE completed"));
    }

    async fn copy(
        &mut self,
        tag: &str,
        set: &SequenceSet,
        mailbox: &Mailbox<'_>,
        uid: bool,
        is_move: bool,
    ) {
        let Some((user, sel)) = self.selected() else {
            return;
        };
        let verb = if is_move { "MOVE" } else { "COPY" };
        if is_move && sel.read_only {
            return self.line(&format!("{tag} NO [READ-ONLY] mailbox is read-only"));
        }
        let target = match mailbox_name(mailbox) {
            Ok(n) => n,
            Err(e) => return self.line(&format!("{tag} NO [TRYCREATE] {}", e.0)),
        };
        let uids: Vec<u32> = resolve(sel, set, uid)
            .into_iter()
            .map(|i| sel.msgs[i].uid)
            .collect();
        let folder = sel.folder.clone();
        let u = user.clone();
        let r = blocking(move || {
            let (uv, pairs) =
                u.store
                    .copy(&folder, &uids, &target, if is_move { 0 } else { u.quota })?;
            if is_move {
                let moved: Vec<u32> = pairs.iter().map(|(s, _)| *s).collect();
                u.store.expunge(&folder, &moved)?;
            }
            Ok::<_, StoreError>((uv, pairs))
        })
        .await;
        match r {
            Ok((uv, pairs)) if !pairs.is_empty() => {
                let src: Vec<String> = pairs.iter().map(|(s, _)| s.to_string()).collect();
                let dst: Vec<String> = pairs.iter().map(|(_, d)| d.to_string()).collect();
                let code = format!("COPYUID {uv} {} {}", src.join(","), dst.join(","));
                if is_move {
                    // RFC 6851: the COPYUID goes in an untagged OK before the expunges.
                    self.line(&format!("* OK [{code}] moved"));
                    self.sync(true).await;
                    self.ok(tag, "MOVE completed");
                } else {
                    self.sync(uid).await;
                    self.ok(tag, &format!("[{code}] COPY completed"));
                }
            }
            Ok(_) => self.ok(tag, &format!("{verb} completed (nothing matched)")),
            Err(StoreError::NoFolder(_)) => {
                self.line(&format!("{tag} NO [TRYCREATE] no such mailbox"))
            }
            Err(StoreError::QuotaExceeded { .. }) => {
                self.line(&format!("{tag} NO [OVERQUOTA] quota exceeded"))
            }
            Err(e) => self.store_error(tag, &e),
        }
    }

    pub(super) fn store_error(&mut self, tag: &str, e: &StoreError) {
        tracing::error!(error = %e, "mail store failed");
        self.line(&format!(
            "{tag} NO [SERVERBUG] internal error, try again later"
        ));
    }
}

/// Waits for a change notice; `false` when there is nothing to wait on (never resolves then).
async fn recv(rx: Option<&mut broadcast::Receiver<String>>) -> bool {
    match rx {
        Some(rx) => match rx.recv().await {
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => true,
            Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// Runs blocking store work off the async workers.
pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(StoreError::Io {
            what: "running",
            path: Default::default(),
            source: std::io::Error::other(e.to_string()),
        })
    })
}

pub(super) fn mailbox_name(m: &Mailbox<'_>) -> Result<String, names::BadName> {
    match m {
        Mailbox::Inbox => Ok("INBOX".to_owned()),
        Mailbox::Other(o) => names::decode(o.as_ref()),
    }
}

fn quoted(s: &str) -> String {
    let mut v = Vec::new();
    wire::string(&mut v, s.as_bytes());
    String::from_utf8_lossy(&v).into_owned()
}

pub(super) fn has_flag(flags: &str, flag: &str) -> bool {
    flags.split(' ').any(|f| f.eq_ignore_ascii_case(flag))
}

/// The view positions a sequence set names: sequence numbers, or UIDs that exist.
pub(super) fn resolve(sel: &Selected, set: &SequenceSet, uid: bool) -> Vec<usize> {
    let n = sel.msgs.len();
    if n == 0 {
        return Vec::new();
    }
    if uid {
        let max_uid = sel.msgs.last().map_or(0, |m| m.uid);
        sel.msgs
            .iter()
            .enumerate()
            .filter(|(_, m)| in_set(set, m.uid, max_uid))
            .map(|(i, _)| i)
            .collect()
    } else {
        let Some(largest) = NonZeroU32::new(n as u32) else {
            return Vec::new();
        };
        set.iter(largest)
            .map(|s| s.get() as usize - 1)
            .filter(|&i| i < n)
            .collect()
    }
}

/// Whether `v` is in the set, `*` being `largest` (RFC 3501 §6.4.8: `n:*` includes the
/// largest even when n is larger).
pub(super) fn in_set(set: &SequenceSet, v: u32, largest: u32) -> bool {
    let val = |s: &SeqOrUid| match s {
        SeqOrUid::Value(x) => x.get(),
        SeqOrUid::Asterisk => largest,
    };
    set.0.as_ref().iter().any(|s| match s {
        Sequence::Single(x) => val(x) == v,
        Sequence::Range(a, b) => {
            let (a, b) = (val(a), val(b));
            let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
            (lo..=hi).contains(&v)
        }
    })
}

pub(super) fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
