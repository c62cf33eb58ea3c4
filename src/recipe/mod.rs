//! Recipes: the YAML that platform engineers write, rendered with minijinja, checked against a
//! typed schema and merged along its `extends:` chain. `load` is the entry point.

pub mod diag;
pub mod limits;
pub mod load;
pub mod locate;
pub mod render;
pub mod sandbox;
pub mod schema;
pub mod validate;

pub use diag::{Diagnostic, Kind as DiagnosticKind};
pub use limits::Limits;
pub use load::{GitInfo, LoadOptions, Loaded, TemplateSet, load};
pub use schema::Recipe;
