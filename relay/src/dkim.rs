//! DKIM signing (RFC 6376) for hosted domains with a key. TODO: being written.
