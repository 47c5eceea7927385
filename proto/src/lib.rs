//! The contracts between kindling's parts, defined once: the host side (the `kindling`
//! binary: CLI, daemon, cluster manager) and the guest agent both build and parse these
//! types, so neither keeps a copy of its own.
//!
//! - [`agent`]: requests to the guest agent and its replies (JSON lines on vsock).
//! - [`phase`]: the bring-up phases and the console line that reports each one.
//! - [`cmdline`]: the `kindling.*` kernel command-line parameters the agent reads.
//! - [`api`]: the provisioner daemon's REST API types (`kindling/openapi.yaml`).
//! - [`forward`]: the `[ADDR:]HOSTPORT:GUESTPORT` grammar of port forwards.
//! - [`exit`]: exit statuses of `kindling boot` that other parts act on.
//! - [`seed`]: the seed disk the host hands a node at boot (the cluster CA).
//! - [`addon`]: the add-ons (name, pinned version, default on or off).
//!
//! This crate depends on serde (and serde_json for the wire lines) only, so both sides
//! can use it without pulling in each other's dependencies.

pub mod addon;
pub mod agent;
pub mod api;
pub mod cmdline;
pub mod exit;
pub mod forward;
pub mod phase;
pub mod seed;
