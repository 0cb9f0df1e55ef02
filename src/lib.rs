//! The iotgate binary's library: start-up ([`startup::Application`]), the admin REST API
//! ([`api`]), admin authentication ([`auth`]) and the [`supervisor::Supervisor`] that turns stored
//! definitions into running modules and replaces exactly the module a change names.

pub mod api;
pub mod auth;
pub mod config;
pub mod error;
pub mod sealing;
pub mod startup;
pub mod supervisor;
pub mod ui;
