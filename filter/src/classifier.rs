//! The statistical classifier (being written).
