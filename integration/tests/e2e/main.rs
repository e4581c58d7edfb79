//! End-to-end tests: the platform assembled, driven through its real binaries and protocols.

mod mailctl;
