//! One module per thing the service does, which is where a request or an event goes. Use
//! cases call adapters (`crate::adapters`) and share the domain's types; nothing in the
//! adapters calls back into them (`shared/tests/layers.rs` checks this).

pub mod accounts;
pub mod callback;
pub mod complete;
pub mod connect;
pub mod disconnect;
pub mod events;
pub mod refresh;
pub mod revocation;
pub mod token;
pub mod verify;
