//! SPF, DKIM and DMARC (being written).
