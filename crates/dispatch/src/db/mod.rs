//! The dispatcher's database layer: one interface over SQLite (the embedded default) and
//! PostgreSQL (`--database postgres://…`, for several dispatchers on one database).
//!
//! Every query of [`crate::store`], [`crate::rollout`] and [`crate::fleet`] is written once,
//! against [`Connection`]: SQL with `?N` placeholders (translated to `$N` for PostgreSQL),
//! parameters as [`ToValue`], rows read back as owned [`Row`]s of [`Value`]s. The SQL sticks
//! to what both dialects speak (`ON CONFLICT … DO NOTHING/UPDATE`, `RETURNING`,
//! `IS [NOT] DISTINCT FROM`, integers for booleans); the schema itself, and so the
//! migrations and the job-event triggers, are per backend ([`sqlite`], [`postgres`]).
//!
//! The interface is blocking: it is called from `spawn_blocking` and from the worker
//! threads, never from an async task (the `postgres` client runs its own runtime).

pub mod postgres;
pub mod sqlite;

use std::cell::RefCell;
use std::ops::Deref;

/// A database failure.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// SQLite failed.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL failed (the server's message, when it sent one).
    #[error("postgres: {}", postgres::describe(.0))]
    Postgres(#[from] ::postgres::Error),
    /// A query expected to return a row returned none.
    #[error("query returned no rows")]
    NoRows,
    /// A column held a value of another type than the one read.
    #[error("column {index}: {message}")]
    Decode {
        /// The column's index.
        index: usize,
        /// What was wrong.
        message: String,
    },
    /// A parameter cannot be stored (an integer beyond `i64`).
    #[error("parameter out of range: {0}")]
    Parameter(String),
    /// The migrations could not be applied.
    #[error("migration: {0}")]
    Migration(String),
}

/// The database layer's result.
pub type Result<T, E = DbError> = std::result::Result<T, E>;

/// Which database a [`Connection`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// SQLite, embedded.
    Sqlite,
    /// A PostgreSQL server.
    Postgres,
}

/// The type of a SQL `NULL` parameter, so PostgreSQL knows what it stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// An integer (also booleans, stored as 0 and 1).
    Int,
    /// A float.
    Real,
    /// Text.
    Text,
}

/// A parameter or a column value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// SQL `NULL`, with the type of what it stands for.
    Null(Kind),
    /// An integer (booleans are 0 and 1 in both backends).
    Int(i64),
    /// A float.
    Real(f64),
    /// Text.
    Text(String),
}

/// A Rust value that can be a query parameter.
pub trait ToValue {
    /// The parameter's value.
    fn to_value(&self) -> Result<Value>;
    /// The type a `None` of this type stands for (text unless said otherwise; a `None`
    /// behind a reference, `Option<&T>`, is always taken for text).
    fn kind() -> Kind
    where
        Self: Sized,
    {
        Kind::Text
    }
}

impl<T: ToValue + ?Sized> ToValue for &T {
    fn to_value(&self) -> Result<Value> {
        (**self).to_value()
    }
}

impl ToValue for str {
    fn to_value(&self) -> Result<Value> {
        Ok(Value::Text(self.to_string()))
    }
}

impl ToValue for String {
    fn to_value(&self) -> Result<Value> {
        Ok(Value::Text(self.clone()))
    }
}

macro_rules! int_to_value {
    ($($t:ty),*) => {$(
        impl ToValue for $t {
            fn to_value(&self) -> Result<Value> {
                i64::try_from(*self).map(Value::Int).map_err(|_| DbError::Parameter(self.to_string()))
            }
            fn kind() -> Kind {
                Kind::Int
            }
        }
    )*};
}
int_to_value!(i64, i32, u32, u16, u8, u64, usize);

impl ToValue for bool {
    fn to_value(&self) -> Result<Value> {
        Ok(Value::Int(i64::from(*self)))
    }
    fn kind() -> Kind {
        Kind::Int
    }
}

impl ToValue for f64 {
    fn to_value(&self) -> Result<Value> {
        Ok(Value::Real(*self))
    }
    fn kind() -> Kind {
        Kind::Real
    }
}

impl<T: ToValue> ToValue for Option<T> {
    fn to_value(&self) -> Result<Value> {
        match self {
            Some(value) => value.to_value(),
            None => Ok(Value::Null(T::kind())),
        }
    }
    fn kind() -> Kind {
        T::kind()
    }
}

/// A query's parameters: `params![…]`, an array of one type (`[id]`), or `()` for none.
pub trait Params {
    /// The parameters' values, in order.
    fn values(&self) -> Result<Vec<Value>>;
}

impl Params for () {
    fn values(&self) -> Result<Vec<Value>> {
        Ok(Vec::new())
    }
}

impl Params for &[&dyn ToValue] {
    fn values(&self) -> Result<Vec<Value>> {
        self.iter().map(|p| p.to_value()).collect()
    }
}

impl<T: ToValue, const N: usize> Params for [T; N] {
    fn values(&self) -> Result<Vec<Value>> {
        self.iter().map(ToValue::to_value).collect()
    }
}

/// Query parameters of mixed types, as a `&[&dyn ToValue]`.
macro_rules! params {
    () => { &[] as &[&dyn $crate::db::ToValue] };
    ($($param:expr),+ $(,)?) => { &[$(&$param as &dyn $crate::db::ToValue),+] as &[&dyn $crate::db::ToValue] };
}
pub(crate) use params;

/// A Rust value a column can be read as.
pub trait FromValue: Sized {
    /// Reads `value` (column `index`, for errors).
    fn from_value(value: &Value, index: usize) -> Result<Self>;
}

fn mismatch<T>(value: &Value, index: usize, wanted: &str) -> Result<T> {
    Err(DbError::Decode { index, message: format!("{value:?} is not {wanted}") })
}

impl FromValue for i64 {
    fn from_value(value: &Value, index: usize) -> Result<Self> {
        match value {
            Value::Int(v) => Ok(*v),
            other => mismatch(other, index, "an integer"),
        }
    }
}

macro_rules! int_from_value {
    ($($t:ty),*) => {$(
        impl FromValue for $t {
            fn from_value(value: &Value, index: usize) -> Result<Self> {
                let v = i64::from_value(value, index)?;
                <$t>::try_from(v).map_err(|_| DbError::Decode {
                    index,
                    message: format!("{v} is out of range for {}", stringify!($t)),
                })
            }
        }
    )*};
}
int_from_value!(i32, u32, u64, usize);

impl FromValue for bool {
    fn from_value(value: &Value, index: usize) -> Result<Self> {
        Ok(i64::from_value(value, index)? != 0)
    }
}

impl FromValue for f64 {
    fn from_value(value: &Value, index: usize) -> Result<Self> {
        match value {
            Value::Real(v) => Ok(*v),
            // Exact for the integers a float column can hold in SQLite.
            Value::Int(v) => Ok(*v as f64),
            other => mismatch(other, index, "a number"),
        }
    }
}

impl FromValue for String {
    fn from_value(value: &Value, index: usize) -> Result<Self> {
        match value {
            Value::Text(s) => Ok(s.clone()),
            other => mismatch(other, index, "text"),
        }
    }
}

impl<T: FromValue> FromValue for Option<T> {
    fn from_value(value: &Value, index: usize) -> Result<Self> {
        match value {
            Value::Null(_) => Ok(None),
            other => T::from_value(other, index).map(Some),
        }
    }
}

/// A column index (the `_` of `row.get::<_, T>(i)`).
pub trait RowIndex {
    /// The index.
    fn index(&self) -> usize;
}

impl RowIndex for usize {
    fn index(&self) -> usize {
        *self
    }
}

/// One row of a query's result, read out of the database.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    values: Vec<Value>,
}

impl Row {
    /// Column `index` as a `T`.
    pub fn get<I: RowIndex, T: FromValue>(&self, index: I) -> Result<T> {
        let index = index.index();
        let value = self
            .values
            .get(index)
            .ok_or_else(|| DbError::Decode { index, message: format!("the row has {} columns", self.values.len()) })?;
        T::from_value(value, index)
    }
}

/// `Result<T>` to `Result<Option<T>>`: no row is `None`.
pub trait OptionalExtension<T> {
    /// `Ok(None)` for [`DbError::NoRows`].
    fn optional(self) -> Result<Option<T>>;
}

impl<T> OptionalExtension<T> for Result<T> {
    fn optional(self) -> Result<Option<T>> {
        match self {
            Ok(value) => Ok(Some(value)),
            Err(DbError::NoRows) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// A connection to the dispatcher's database, SQLite or PostgreSQL. The store keeps it
/// behind a mutex; the PostgreSQL client (whose calls take `&mut`) sits in a `RefCell`,
/// which that mutex makes exclusive.
pub enum Connection {
    /// An SQLite database file (or memory).
    Sqlite(rusqlite::Connection),
    /// A PostgreSQL session (boxed: it is much larger than an SQLite handle).
    Postgres(Box<RefCell<postgres::PgSession>>),
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Connection({:?})", self.backend())
    }
}

impl Connection {
    /// Which database this is.
    pub fn backend(&self) -> Backend {
        match self {
            Connection::Sqlite(_) => Backend::Sqlite,
            Connection::Postgres(_) => Backend::Postgres,
        }
    }

    /// Runs a statement; answers how many rows it changed.
    pub fn execute(&self, sql: &str, params: impl Params) -> Result<usize> {
        let values = params.values()?;
        match self {
            Connection::Sqlite(conn) => sqlite::execute(conn, sql, &values),
            Connection::Postgres(session) => session.borrow_mut().execute(sql, &values),
        }
    }

    /// Every row `sql` returns.
    pub fn query_rows(&self, sql: &str, params: impl Params) -> Result<Vec<Row>> {
        let values = params.values()?;
        match self {
            Connection::Sqlite(conn) => sqlite::query(conn, sql, &values),
            Connection::Postgres(session) => session.borrow_mut().query(sql, &values),
        }
    }

    /// Runs statements without parameters, separated by `;`.
    pub fn execute_batch(&self, sql: &str) -> Result<()> {
        match self {
            Connection::Sqlite(conn) => Ok(conn.execute_batch(sql)?),
            Connection::Postgres(session) => session.borrow_mut().batch(sql),
        }
    }

    /// `f` of the first row `sql` returns; [`DbError::NoRows`] if none.
    pub fn query_row<T>(&self, sql: &str, params: impl Params, f: impl FnOnce(&Row) -> Result<T>) -> Result<T> {
        let rows = self.query_rows(sql, params)?;
        f(rows.first().ok_or(DbError::NoRows)?)
    }

    /// A statement to run, in the style of rusqlite's cached statements (the backends
    /// cache the prepared form by its text).
    pub fn prepare_cached(&self, sql: &str) -> Result<Statement<'_>> {
        Ok(Statement { conn: self, sql: sql.to_string() })
    }

    /// Starts a transaction, rolled back when dropped without [`Transaction::commit`].
    pub fn transaction(&mut self) -> Result<Transaction<'_>> {
        match self {
            Connection::Sqlite(conn) => conn.execute_batch("BEGIN")?,
            Connection::Postgres(session) => session.borrow_mut().begin()?,
        }
        Ok(Transaction { conn: self, committed: false })
    }

    fn end_transaction(&self, commit: bool) -> Result<()> {
        match self {
            Connection::Sqlite(conn) => Ok(conn.execute_batch(if commit { "COMMIT" } else { "ROLLBACK" })?),
            Connection::Postgres(session) => session.borrow_mut().end(commit),
        }
    }
}

/// One statement of a [`Connection`].
pub struct Statement<'c> {
    conn: &'c Connection,
    sql: String,
}

impl Statement<'_> {
    /// Runs it; answers how many rows it changed.
    pub fn execute(&mut self, params: impl Params) -> Result<usize> {
        self.conn.execute(&self.sql, params)
    }

    /// `f` of its first row; [`DbError::NoRows`] if none.
    pub fn query_row<T>(&mut self, params: impl Params, f: impl FnOnce(&Row) -> Result<T>) -> Result<T> {
        self.conn.query_row(&self.sql, params, f)
    }

    /// `f` of each row, in order.
    pub fn query_map<T>(
        &mut self,
        params: impl Params,
        mut f: impl FnMut(&Row) -> Result<T>,
    ) -> Result<std::vec::IntoIter<Result<T>>> {
        let rows = self.conn.query_rows(&self.sql, params)?;
        Ok(rows.iter().map(&mut f).collect::<Vec<_>>().into_iter())
    }

    /// Whether it returns any row.
    pub fn exists(&mut self, params: impl Params) -> Result<bool> {
        Ok(!self.conn.query_rows(&self.sql, params)?.is_empty())
    }
}

/// A transaction on a [`Connection`]; derefs to it.
pub struct Transaction<'c> {
    conn: &'c Connection,
    committed: bool,
}

impl Transaction<'_> {
    /// Commits it.
    pub fn commit(mut self) -> Result<()> {
        self.committed = true;
        self.conn.end_transaction(true)
    }
}

impl Deref for Transaction<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        self.conn
    }
}

impl Drop for Transaction<'_> {
    fn drop(&mut self) {
        if !self.committed {
            // Nothing to do about a failed rollback: the connection reports its next error.
            if let Err(e) = self.conn.end_transaction(false) {
                log::warn!("rolling back a transaction: {e}");
            }
        }
    }
}
