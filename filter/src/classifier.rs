//! The statistical spam classifier: a tokenizer and a logistic-regression model over its tokens.
//!
//! - [`tokens`] turns a raw RFC 5322 message into a set of feature strings: words of the
//!   decoded text and HTML bodies, Subject words, URL hosts and a few header facts. Its work is
//!   bounded by [`Limits`] whatever the input.
//! - [`Model`] has one weight per token, fitted on labelled spam and ham by [`Model::train`];
//!   [`Model::score`] gives a message's spam probability.
//! - A model is one JSON file, written atomically by [`Model::save`] and read by [`Model::load`].
//!
//! Nothing here trusts the message: it is peer data, parsed under limits, never indexed blindly.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Write as _};
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use mail_parser::{HeaderName, HeaderValue, MessageParser, MimeHeaders as _, PartType};
use regex::Regex;
use serde::{Deserialize, Serialize};

/// How much of one message the tokenizer looks at. Everything past a limit is ignored, so the
/// time and memory spent on a message are bounded whatever it contains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of the raw message handed to the MIME parser (the rest is cut off before parsing),
    /// and also the most decoded body text scanned for words. Default 256 KiB.
    pub max_bytes: usize,
    /// MIME parts looked at, in the parser's order (the root first). Default 100.
    pub max_parts: usize,
    /// Distinct tokens returned; tokenizing stops at this many. Default 5000.
    pub max_tokens: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_bytes: 256 * 1024,
            max_parts: 100,
            max_tokens: 5000,
        }
    }
}

/// Why a model could not be saved or loaded.
#[derive(Debug, thiserror::Error)]
pub enum ClassifierError {
    /// Reading, writing, syncing or renaming a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory concerned.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a model this code can read.
    #[error("{path}: not a classifier model: {source}")]
    Format {
        /// The model file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// The file is a model of another format version.
    #[error("{path}: model format version {found}, expected {MODEL_VERSION}")]
    Version {
        /// The model file.
        path: PathBuf,
        /// The version the file says it has.
        found: u32,
    },
}

/// Returns the distinct tokens (features) of a raw message, in the order first seen, at most
/// `limits.max_tokens` of them.
///
/// A token is a lower-cased string, prefixed by where it came from:
/// - body words (text/plain, and text/html with its tags stripped; decoded from their transfer
///   encoding and charset) have no prefix; a word is 3 to 20 characters once the punctuation
///   around it is trimmed, and a longer one becomes `skip:<first char>:<length / 10 * 10>`;
/// - `s:` Subject words, and `s:` facts such as `s:allcaps`, `s:!`;
/// - `url:<host>` and `urld:<last two labels>` for each URL (the URL gives no word tokens),
///   `email:<domain>` for a bare address in the text, `tag:<name>` for each HTML tag name;
/// - header facts: `h:<name>` for each header field present (except `X-Spam-*`, the verdicts of
///   some other filter), `noh:<name>` for a missing Date, Message-ID, To, From or Subject,
///   `from:<domain>`, `from:noname`, `replyto:<domain>`, `replyto:other`, `to:n<bucket>`,
///   `rcvd:<count up to 10>`, `xm:<X-Mailer or User-Agent word>`, `ct:<root type/subtype>`,
///   `pct:<part type/subtype>`, `cte:<part transfer encoding>`, `charset:<name>`,
///   `parts:<bucket>`.
///
/// Work is bounded: the parser sees at most `limits.max_bytes` of the input, at most
/// `limits.max_parts` parts and `limits.max_bytes` of decoded text are scanned.
pub fn tokens(message: &[u8], limits: &Limits) -> Vec<String> {
    let mut out = Tokens::new(limits.max_tokens);
    let raw = message.get(..limits.max_bytes).unwrap_or(message);
    let parser = MessageParser::new()
        .with_mime_headers()
        .header_text(HeaderName::Subject)
        .header_address(HeaderName::From)
        .header_address(HeaderName::ReplyTo)
        .header_raw(HeaderName::To)
        .header_raw(HeaderName::Cc)
        .default_header_raw();
    let Some(parsed) = parser.parse(raw) else {
        return out.into_vec();
    };
    header_tokens(&parsed, &mut out);
    body_tokens(&parsed, limits, &mut out);
    out.into_vec()
}

/// A logistic-regression spam model over the tokens of [`tokens`].
///
/// A message's score is `sigmoid(bias + Σ weight(t) / √n)` over its `n` distinct tokens `t`
/// (unknown tokens weigh 0; dividing by √n keeps long messages from saturating the score).
/// [`Model::train`] fits the weights by AdaGrad on the log loss, with spam and ham weighted so
/// that both classes count as much however many of each there are.
///
/// Why not naive Bayes: with the same tokens, 5-fold cross-validation on the SpamAssassin
/// training groups (500 spam, 2750 ham) gave Robinson/Fisher naive Bayes (SpamBayes' defaults)
/// at best 2 false positives and 88 false negatives (at 0.98), and this model 0 and 57 (at
/// 0.95): see `bench/README.md`.
///
/// Tokens seen in fewer than [`MIN_TOKEN_COUNT`] training messages get no weight, so the model
/// (and its file) stays small, and a loaded model scores exactly as the one saved.
#[derive(Debug, Clone, Default)]
pub struct Model {
    spam: u64,
    ham: u64,
    bias: f64,
    weights: HashMap<String, f64>,
    limits: Limits,
}

impl Model {
    /// An empty model, tokenizing with the default [`Limits`]. It scores everything 0.5.
    pub fn new() -> Self {
        Self::default()
    }

    /// Trains a model on raw spam and ham messages (each iterator is read once, and only the
    /// tokens of each message are kept meanwhile). Deterministic: the same messages in the same
    /// order give the same model.
    pub fn train(
        spam: impl IntoIterator<Item = Vec<u8>>,
        ham: impl IntoIterator<Item = Vec<u8>>,
    ) -> Self {
        let limits = Limits::default();
        let mut vocab = Vocabulary::default();
        let mut examples = Vec::new();
        for m in spam {
            examples.push((vocab.ids(tokens(&m, &limits)), true));
        }
        for m in ham {
            examples.push((vocab.ids(tokens(&m, &limits)), false));
        }
        Self::fit(vocab, examples, limits)
    }

    /// The same model, tokenizing with `limits` from now on (limits are not saved with it).
    pub fn with_limits(self, limits: Limits) -> Self {
        Self { limits, ..self }
    }

    /// Whether the model was trained on at least one spam and one ham message, so that its
    /// scores mean something.
    pub fn is_trained(&self) -> bool {
        self.spam > 0 && self.ham > 0
    }

    /// Spam messages trained on.
    pub fn spam_count(&self) -> u64 {
        self.spam
    }

    /// Ham messages trained on.
    pub fn ham_count(&self) -> u64 {
        self.ham
    }

    /// Tokens with a weight.
    pub fn token_count(&self) -> usize {
        self.weights.len()
    }

    /// The probability that a raw message is spam, in [0, 1]; exactly 0.5 when the model is not
    /// trained.
    pub fn score(&self, message: &[u8]) -> f64 {
        if !self.is_trained() {
            return 0.5;
        }
        let toks = tokens(message, &self.limits);
        let sum: f64 = toks
            .iter()
            .filter_map(|t| self.weights.get(t.as_str()))
            .sum();
        sigmoid(self.bias + sum * norm(toks.len()))
    }

    /// Writes the model to `path` (JSON): into a temporary file beside it, fsynced, renamed over
    /// `path`, then the directory fsynced. Missing parent directories are created.
    pub fn save(&self, path: &Path) -> Result<(), ClassifierError> {
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |source| ClassifierError::Io { path: p, source }
        };
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        let file = ModelFile {
            format: MODEL_FORMAT.to_owned(),
            version: MODEL_VERSION,
            spam: self.spam,
            ham: self.ham,
            bias: self.bias,
            weights: self.weights.iter().map(|(t, w)| (t.clone(), *w)).collect(),
        };
        let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
        tmp_name.push(format!(".tmp{}", std::process::id()));
        let tmp = dir.join(tmp_name);
        let written = (|| {
            let f = File::create(&tmp)?;
            let mut w = BufWriter::new(f);
            serde_json::to_writer(&mut w, &file).map_err(std::io::Error::other)?;
            w.flush()?;
            w.get_ref().sync_all()
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(io(&tmp)(e));
        }
        fs::rename(&tmp, path).map_err(io(path))?;
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&dir))
    }

    /// Reads a model written by [`Model::save`]. It tokenizes with the default [`Limits`].
    pub fn load(path: &Path) -> Result<Self, ClassifierError> {
        let f = File::open(path).map_err(|source| ClassifierError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let file: ModelFile = serde_json::from_reader(BufReader::new(f)).map_err(|source| {
            ClassifierError::Format {
                path: path.to_path_buf(),
                source,
            }
        })?;
        if file.version != MODEL_VERSION || file.format != MODEL_FORMAT {
            return Err(ClassifierError::Version {
                path: path.to_path_buf(),
                found: file.version,
            });
        }
        Ok(Self {
            spam: file.spam,
            ham: file.ham,
            bias: file.bias,
            weights: file.weights.into_iter().collect(),
            limits: Limits::default(),
        })
    }

    /// AdaGrad on the class-weighted log loss, over the examples in a fixed pseudo-random order
    /// each epoch.
    fn fit(vocab: Vocabulary, examples: Vec<(Vec<u32>, bool)>, limits: Limits) -> Self {
        let spam = examples.iter().filter(|(_, s)| *s).count();
        let ham = examples.len() - spam;
        let mut model = Self {
            spam: spam as u64,
            ham: ham as u64,
            limits,
            ..Self::default()
        };
        if spam == 0 || ham == 0 {
            return model;
        }
        // Each class weighs as much in total: n / (2 n_class) per message.
        let n = examples.len() as f64;
        let class_weight = |is_spam: bool| n / (2.0 * if is_spam { spam } else { ham } as f64);
        let kept: Vec<bool> = vocab.df.iter().map(|&df| df >= MIN_TOKEN_COUNT).collect();
        let mut w = vec![0.0f64; vocab.df.len()];
        let mut g2 = vec![ADAGRAD_EPSILON; vocab.df.len()];
        let mut bias = 0.0;
        let mut order: Vec<usize> = (0..examples.len()).collect();
        let mut rng = Lcg(0x5eed);
        for _ in 0..EPOCHS {
            rng.shuffle(&mut order);
            for &i in &order {
                let Some((ids, is_spam)) = examples.get(i) else {
                    continue;
                };
                let scale = norm(ids.len());
                let dot: f64 = ids
                    .iter()
                    .filter(|&&id| kept[id as usize])
                    .map(|&id| w[id as usize])
                    .sum();
                let p = sigmoid(bias + dot * scale);
                let y = if *is_spam { 1.0 } else { 0.0 };
                let g = (p - y) * class_weight(*is_spam);
                for &id in ids.iter().filter(|&&id| kept[id as usize]) {
                    let gi = g * scale;
                    g2[id as usize] += gi * gi;
                    w[id as usize] -= LEARNING_RATE * gi / g2[id as usize].sqrt();
                }
                bias -= BIAS_STEP * g;
            }
        }
        model.bias = bias;
        model.weights = vocab
            .tokens
            .into_iter()
            .zip(w)
            .zip(kept)
            .filter(|((_, _), k)| *k)
            .map(|((t, w), _)| (t, w))
            .collect();
        model
    }
}

/// Tokens seen in fewer training messages than this get no weight.
pub const MIN_TOKEN_COUNT: u32 = 2;

/// Passes over the training messages.
const EPOCHS: usize = 10;
/// AdaGrad's base step.
const LEARNING_RATE: f64 = 0.5;
const ADAGRAD_EPSILON: f64 = 1e-8;
/// The bias's (plain gradient) step.
const BIAS_STEP: f64 = 0.05;

/// The version of the model file format this code writes and reads.
const MODEL_VERSION: u32 = 1;
const MODEL_FORMAT: &str = "logistic-regression";

/// The saved form of a [`Model`]. Tokens are sorted, so a file diffs well.
#[derive(Serialize, Deserialize)]
struct ModelFile {
    format: String,
    version: u32,
    spam: u64,
    ham: u64,
    bias: f64,
    /// Token → weight.
    weights: BTreeMap<String, f64>,
}

/// Token ids while training, and in how many messages each token was.
#[derive(Default)]
struct Vocabulary {
    ids: HashMap<String, u32>,
    tokens: Vec<String>,
    df: Vec<u32>,
}

impl Vocabulary {
    /// The ids of a message's distinct tokens, counting each once more.
    fn ids(&mut self, toks: Vec<String>) -> Vec<u32> {
        toks.into_iter()
            .map(|t| {
                let id = match self.ids.get(&t) {
                    Some(&id) => id,
                    None => {
                        let id = u32::try_from(self.tokens.len()).unwrap_or(u32::MAX);
                        self.ids.insert(t.clone(), id);
                        self.tokens.push(t);
                        self.df.push(0);
                        id
                    }
                };
                if let Some(df) = self.df.get_mut(id as usize) {
                    *df = df.saturating_add(1);
                }
                id
            })
            .collect()
    }
}

/// The scale of a message's weight sum: 1/√(distinct tokens).
fn norm(n: usize) -> f64 {
    1.0 / (n.max(1) as f64).sqrt()
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

/// A small deterministic generator (Knuth's MMIX LCG) for the training order.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    /// Fisher–Yates.
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

/// The distinct tokens of one message, up to a limit.
struct Tokens {
    seen: HashSet<String>,
    order: Vec<String>,
    max: usize,
}

impl Tokens {
    fn new(max: usize) -> Self {
        Self {
            seen: HashSet::new(),
            order: Vec::new(),
            max,
        }
    }

    fn is_full(&self) -> bool {
        self.order.len() >= self.max
    }

    fn push(&mut self, token: &str) {
        if self.is_full() || self.seen.contains(token) {
            return;
        }
        self.seen.insert(token.to_owned());
        self.order.push(token.to_owned());
    }

    fn push_prefixed(&mut self, prefix: &str, value: &str) {
        let mut t = String::with_capacity(prefix.len() + value.len());
        t.push_str(prefix);
        t.push_str(value);
        self.push(&t);
    }

    fn into_vec(self) -> Vec<String> {
        self.order
    }
}

/// Header fields whose absence is a token.
const EXPECTED_HEADERS: [&str; 5] = ["date", "message-id", "to", "from", "subject"];

fn header_tokens(msg: &mail_parser::Message<'_>, out: &mut Tokens) {
    let mut received = 0usize;
    let mut present = HashSet::new();
    for h in msg.headers() {
        let name = h.name().to_ascii_lowercase();
        if name == "received" {
            received += 1;
        }
        if !name.starts_with("x-spam") && present.insert(name.clone()) {
            out.push_prefixed("h:", &name);
        }
    }
    for name in EXPECTED_HEADERS {
        if !present.contains(name) {
            out.push_prefixed("noh:", name);
        }
    }
    out.push(&format!("rcvd:{}", received.min(10)));

    if let Some(subject) = msg.subject() {
        subject_tokens(subject, out);
    }
    let from_domain = msg.from().and_then(|a| a.first()).map(|a| {
        if a.name.as_deref().is_none_or(str::is_empty) {
            out.push("from:noname");
        }
        domain_of(a.address.as_deref().unwrap_or_default())
    });
    if let Some(d) = &from_domain {
        out.push_prefixed("from:", d);
    }
    if let Some(reply) = msg.reply_to().and_then(|a| a.first()) {
        let d = domain_of(reply.address.as_deref().unwrap_or_default());
        out.push_prefixed("replyto:", &d);
        if from_domain.as_deref() != Some(d.as_str()) {
            out.push("replyto:other");
        }
    }
    let recipients: usize = [HeaderName::To, HeaderName::Cc]
        .into_iter()
        .filter_map(|n| msg.header(n).and_then(HeaderValue::as_text))
        .map(|v| v.bytes().filter(|&b| b == b'@').count())
        .sum();
    out.push(&format!("to:n{}", bucket(recipients)));
    for name in ["X-Mailer", "User-Agent"] {
        if let Some(v) = msg.header(name).and_then(HeaderValue::as_text) {
            for w in v.split_whitespace().take(4) {
                let w = w
                    .trim_matches(|c: char| !c.is_alphanumeric())
                    .to_lowercase();
                if !w.is_empty() && w.len() <= 20 {
                    out.push_prefixed("xm:", &w);
                }
            }
        }
    }
}

fn subject_tokens(subject: &str, out: &mut Tokens) {
    let letters: Vec<char> = subject
        .chars()
        .take(1000)
        .filter(|c| c.is_alphabetic())
        .collect();
    if letters.len() >= 3 && letters.iter().all(|c| c.is_uppercase()) {
        out.push("s:allcaps");
    }
    for (mark, token) in [('!', "s:!"), ('$', "s:$"), ('%', "s:%")] {
        if subject.contains(mark) {
            out.push(token);
        }
    }
    for w in subject.split_whitespace().take(100) {
        if let Some(w) = word(w) {
            out.push_prefixed("s:", &w);
        }
    }
}

fn body_tokens(msg: &mail_parser::Message<'_>, limits: &Limits, out: &mut Tokens) {
    let mut text_budget = limits.max_bytes;
    let parts = &msg.parts;
    out.push(&format!("parts:{}", bucket(parts.len())));
    for (i, part) in parts.iter().take(limits.max_parts).enumerate() {
        if out.is_full() {
            break;
        }
        if let Some(ct) = part.content_type() {
            let t = format!(
                "{}/{}",
                ct.ctype().to_lowercase(),
                ct.subtype().unwrap_or("").to_lowercase()
            );
            if i == 0 {
                out.push_prefixed("ct:", &t);
            }
            out.push_prefixed("pct:", &t);
            if let Some(cs) = ct.attribute("charset") {
                out.push_prefixed("charset:", &cs.to_lowercase());
            }
        }
        if let Some(cte) = part.content_transfer_encoding() {
            out.push_prefixed("cte:", &cte.to_lowercase());
        }
        let (text, is_html) = match &part.body {
            PartType::Text(t) => (t.as_ref(), false),
            PartType::Html(h) => (h.as_ref(), true),
            _ => continue,
        };
        let text = truncate(text, text_budget);
        text_budget -= text.len();
        if is_html {
            url_tokens(text, out);
            let stripped = strip_html(text, out);
            text_tokens(&stripped, out);
        } else {
            url_tokens(text, out);
            text_tokens(text, out);
        }
        if text_budget == 0 {
            break;
        }
    }
}

static URL: LazyLock<Option<Regex>> =
    LazyLock::new(|| Regex::new(r"(?i)(?:https?://|www\.)([a-z0-9][a-z0-9.-]{0,252})").ok());

fn url_tokens(text: &str, out: &mut Tokens) {
    let Some(re) = URL.as_ref() else { return };
    for cap in re.captures_iter(text) {
        if out.is_full() {
            return;
        }
        let Some(host) = cap.get(1) else { continue };
        let mut host = host.as_str().trim_end_matches(['.', '-']).to_lowercase();
        if cap
            .get(0)
            .is_some_and(|m| m.as_str().to_lowercase().starts_with("www."))
        {
            host.insert_str(0, "www.");
        }
        out.push_prefixed("url:", &host);
        let labels: Vec<&str> = host.rsplitn(3, '.').collect();
        if labels.len() >= 2 {
            out.push(&format!("urld:{}.{}", labels[1], labels[0]));
        }
    }
}

fn text_tokens(text: &str, out: &mut Tokens) {
    for raw in text.split_whitespace() {
        if out.is_full() {
            return;
        }
        let lower = raw.to_ascii_lowercase();
        if lower.contains("://") || lower.starts_with("www.") {
            continue; // URL: its host is a token already
        }
        let trimmed = trim_punct(raw);
        if let Some((_, domain)) = trimmed.split_once('@')
            && domain.contains('.')
        {
            out.push_prefixed("email:", &trim_punct(domain).to_lowercase());
            continue;
        }
        if let Some(w) = word(raw) {
            out.push(&w);
        } else {
            let n = trimmed.chars().count();
            if n > MAX_WORD_CHARS
                && let Some(first) = trimmed.chars().next()
            {
                out.push(&format!("skip:{}:{}", first.to_lowercase(), n / 10 * 10));
            }
        }
    }
}

const MIN_WORD_CHARS: usize = 3;
const MAX_WORD_CHARS: usize = 20;

/// The lower-cased word in `raw` with its surrounding punctuation trimmed, when it is 3 to 20
/// characters long.
fn word(raw: &str) -> Option<String> {
    let w = trim_punct(raw);
    let n = w.chars().count();
    (MIN_WORD_CHARS..=MAX_WORD_CHARS)
        .contains(&n)
        .then(|| w.to_lowercase())
}

fn trim_punct(s: &str) -> &str {
    s.trim_matches(|c: char| !(c.is_alphanumeric() || c == '$' || c == '%' || c == '!' || c == '@'))
        .trim_end_matches(['!'])
}

/// The lower-cased domain of an address, or "" without one.
fn domain_of(address: &str) -> String {
    address
        .rsplit_once('@')
        .map(|(_, d)| d.trim_end_matches('>').to_lowercase())
        .unwrap_or_default()
}

/// 0, 1, 2, 3-4, 5-8, ... as 0, 1, 2, 4, 8, ...: powers of two, capped at 1024.
fn bucket(n: usize) -> usize {
    if n <= 2 {
        n
    } else {
        n.next_power_of_two().min(1024)
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The text of an HTML document: tags and comments removed, the contents of `<script>` and
/// `<style>` dropped, a few entities decoded. Each tag name becomes a `tag:` token.
fn strip_html(html: &str, out: &mut Tokens) -> String {
    let mut text = String::with_capacity(html.len() / 2);
    let mut rest = html;
    let mut skip_until: Option<&str> = None;
    while let Some(lt) = rest.find('<') {
        if skip_until.is_none() {
            push_entities(&rest[..lt], &mut text);
        }
        let after = &rest[lt + 1..];
        if after.starts_with("!--") {
            rest = after.find("-->").map_or("", |e| &after[e + 3..]);
            continue;
        }
        let end = after.find('>').unwrap_or(after.len());
        let tag = &after[..end];
        rest = after.get(end + 1..).unwrap_or("");
        let name: String = tag
            .trim_start_matches('/')
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .take(10)
            .collect::<String>()
            .to_ascii_lowercase();
        if let Some(closing) = skip_until {
            if tag.starts_with('/') && name == closing {
                skip_until = None;
            }
            continue;
        }
        if !name.is_empty() {
            out.push_prefixed("tag:", &name);
            if !tag.starts_with('/') && (name == "script" || name == "style") {
                skip_until = Some(if name == "script" { "script" } else { "style" });
            }
        }
        text.push(' ');
    }
    if skip_until.is_none() {
        push_entities(rest, &mut text);
    }
    text
}

/// Appends `s` with the common HTML entities decoded.
fn push_entities(s: &str, text: &mut String) {
    let mut rest = s;
    while let Some(amp) = rest.find('&') {
        text.push_str(&rest[..amp]);
        let after = &rest[amp + 1..];
        let entity = after.find(';').filter(|&e| e <= 8).map(|e| &after[..e]);
        let decoded = entity.and_then(|e| match e {
            "nbsp" => Some(' '),
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            _ => e
                .strip_prefix("#x")
                .or_else(|| e.strip_prefix("#X"))
                .and_then(|h| u32::from_str_radix(h, 16).ok())
                .or_else(|| e.strip_prefix('#').and_then(|d| d.parse().ok()))
                .and_then(char::from_u32),
        });
        match (entity, decoded) {
            (Some(e), Some(c)) => {
                text.push(c);
                rest = &after[e.len() + 1..];
            }
            _ => {
                text.push('&');
                rest = after;
            }
        }
    }
    text.push_str(rest);
}

#[cfg(test)]
mod tests {
    use tokio::time::Instant;

    use super::*;

    fn spam(i: usize) -> Vec<u8> {
        format!(
            "From: \"Deals\" <promo{i}@cheap-pills.example>\r\nTo: you@example.test\r\n\
             Subject: FREE VIAGRA now!!! limited offer {i}\r\nContent-Type: text/html\r\n\r\n\
             <html><body><font color=red>Buy cheap viagra, cialis and rolex replicas!</font> \
             Click <a href=\"http://pills{i}.cheap-pills.example/buy\">here</a> to order now. \
             Free shipping, best price guaranteed, unsubscribe anytime.</body></html>\r\n"
        )
        .into_bytes()
    }

    fn ham(i: usize) -> Vec<u8> {
        format!(
            "From: Alice Smith <alice@example.org>\r\nTo: bob@example.test\r\n\
             Date: Mon, 1 Jan 2024 10:00:00 +0000\r\nMessage-ID: <{i}@example.org>\r\n\
             Subject: Re: meeting notes for project {i}\r\n\r\n\
             Hi Bob,\r\nattached are the notes from yesterday's meeting about the \
             compiler release. Could you review the patch before Thursday? The build \
             failed on the integration tests again.\r\nThanks, Alice\r\n"
        )
        .into_bytes()
    }

    fn trained() -> Model {
        Model::train((0..20).map(spam), (0..20).map(ham))
    }

    #[test]
    fn tokens_cover_subject_body_urls_and_headers() {
        let t = tokens(&spam(1), &Limits::default());
        for want in [
            "s:free",
            "s:viagra",
            "viagra",
            "cheap",
            "shipping",
            "url:pills1.cheap-pills.example",
            "urld:cheap-pills.example",
            "tag:font",
            "from:cheap-pills.example",
            "h:subject",
            "noh:date",
            "ct:text/html",
            "rcvd:0",
            "to:n1",
        ] {
            assert!(t.iter().any(|x| x == want), "{want} missing from {t:?}");
        }
        assert!(
            !t.iter().any(|x| x.contains("http") || x == "color=red"),
            "{t:?}"
        );
        let unique: HashSet<&String> = t.iter().collect();
        assert_eq!(unique.len(), t.len(), "tokens are distinct");
    }

    #[test]
    fn tokens_decode_transfer_encodings_and_skip_long_words() {
        let msg = b"Subject: HUGE SAVINGS\r\nContent-Type: text/plain; charset=utf-8\r\n\
            Content-Transfer-Encoding: quoted-printable\r\n\r\n\
            Caf=C3=A9 r=C3=A9sum=C3=A9 aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa ok\r\n";
        let t = tokens(msg, &Limits::default());
        for want in [
            "café",
            "résumé",
            "skip:a:30",
            "charset:utf-8",
            "cte:quoted-printable",
            "s:allcaps",
            "s:huge",
        ] {
            assert!(t.iter().any(|x| x == want), "{want} missing from {t:?}");
        }
        assert!(!t.iter().any(|x| x == "ok"), "words are 3+ chars: {t:?}");
    }

    #[test]
    fn untrained_model_scores_one_half() {
        assert!(!Model::new().is_trained());
        assert_eq!(Model::new().score(&spam(1)), 0.5);
        let only_spam = Model::train((0..3).map(spam), std::iter::empty());
        assert!(!only_spam.is_trained());
        assert_eq!(only_spam.score(&spam(1)), 0.5);
    }

    #[test]
    fn synthetic_corpus_separates() {
        let m = trained();
        assert!(m.is_trained());
        assert_eq!((m.spam_count(), m.ham_count()), (20, 20));
        for i in 100..110 {
            let s = m.score(&spam(i));
            let h = m.score(&ham(i));
            assert!(s > 0.9, "spam {i} scored {s}");
            assert!(h < 0.1, "ham {i} scored {h}");
        }
    }

    #[test]
    fn save_load_roundtrip_scores_identically() {
        let m = Model::train(
            (0..20).map(spam),
            (0..20)
                .map(ham)
                .chain([b"Subject: hapax\r\n\r\nunique words seen once\r\n".to_vec()]),
        );
        assert_eq!((m.spam_count(), m.ham_count()), (20, 21));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/model.json");
        m.save(&path).unwrap();
        let loaded = Model::load(&path).unwrap();
        assert_eq!(
            (loaded.spam_count(), loaded.ham_count()),
            (m.spam_count(), m.ham_count())
        );
        assert_eq!(loaded.token_count(), m.token_count());
        for i in 0..30 {
            assert_eq!(
                loaded.score(&spam(i)).to_bits(),
                m.score(&spam(i)).to_bits()
            );
            assert_eq!(loaded.score(&ham(i)).to_bits(), m.score(&ham(i)).to_bits());
        }
        let text = fs::read_to_string(&path).unwrap();
        assert!(!text.contains("\"unique\""), "hapaxes are pruned");
        let names: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["model.json"], "no temporary file left");
    }

    #[test]
    fn load_rejects_garbage_and_other_versions() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.json");
        fs::write(&p, "not json").unwrap();
        assert!(matches!(
            Model::load(&p),
            Err(ClassifierError::Format { .. })
        ));
        fs::write(
            &p,
            r#"{"format":"logistic-regression","version":99,"spam":1,"ham":1,"bias":0,"weights":{}}"#,
        )
        .unwrap();
        assert!(matches!(
            Model::load(&p),
            Err(ClassifierError::Version { found: 99, .. })
        ));
        assert!(matches!(
            Model::load(&dir.path().join("missing")),
            Err(ClassifierError::Io { .. })
        ));
    }

    fn assert_bounded(name: &str, msg: &[u8]) {
        let m = trained();
        let limits = Limits::default();
        let start = Instant::now();
        let t = tokens(msg, &limits);
        let score = m.score(msg);
        let elapsed = start.elapsed();
        assert!(t.len() <= limits.max_tokens, "{name}: {} tokens", t.len());
        assert!((0.0..=1.0).contains(&score), "{name}: score {score}");
        assert!(
            elapsed.as_secs_f64() < 2.0,
            "{name}: took {elapsed:?} for {} bytes",
            msg.len()
        );
    }

    #[test]
    fn pathological_many_mime_parts() {
        let mut msg =
            b"Subject: parts\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n".to_vec();
        for i in 0..100_000 {
            msg.extend_from_slice(
                format!("--b\r\nContent-Type: text/plain\r\n\r\nw{i}x\r\n").as_bytes(),
            );
        }
        msg.extend_from_slice(b"--b--\r\n");
        assert_bounded("100k parts", &msg);
    }

    #[test]
    fn pathological_nested_multiparts() {
        let mut msg = b"Subject: nested\r\n".to_vec();
        for i in 0..1000 {
            msg.extend_from_slice(
                format!("Content-Type: multipart/mixed; boundary=b{i}\r\n\r\n--b{i}\r\n")
                    .as_bytes(),
            );
        }
        msg.extend_from_slice(b"Content-Type: text/plain\r\n\r\ndeep inside\r\n");
        for i in (0..1000).rev() {
            msg.extend_from_slice(format!("--b{i}--\r\n").as_bytes());
        }
        assert_bounded("1k nested multiparts", &msg);
    }

    #[test]
    fn pathological_huge_header_line() {
        let mut msg = b"Subject: ".to_vec();
        msg.extend(std::iter::repeat_n(b'a', 5 * 1024 * 1024));
        msg.extend_from_slice(b"\r\n\r\nbody\r\n");
        assert_bounded("5 MB header", &msg);
        let mut words = b"Subject: ".to_vec();
        for i in 0..800_000 {
            words.extend_from_slice(format!("w{i} ").as_bytes());
        }
        words.extend_from_slice(b"\r\n\r\nbody\r\n");
        assert_bounded("a Subject of 800k words", &words);
    }

    #[test]
    fn pathological_many_recipients() {
        let mut msg = b"From: a@example.org\r\nTo: ".to_vec();
        for i in 0..100_000 {
            msg.extend_from_slice(format!("user{i}@example{i}.test, ").as_bytes());
        }
        msg.extend_from_slice(b"last@example.test\r\nSubject: hi\r\n\r\nbody text\r\n");
        assert_bounded("100k addresses in To:", &msg);
    }

    #[test]
    fn pathological_huge_body_is_cut() {
        let mut msg = b"Subject: big\r\n\r\n".to_vec();
        for i in 0..2_000_000 {
            msg.extend_from_slice(format!("word{i} ").as_bytes());
        }
        let limits = Limits::default();
        let t = tokens(&msg, &limits);
        assert_eq!(t.len(), limits.max_tokens, "stops at max_tokens");
        assert_bounded("16 MB body", &msg);
    }
}
