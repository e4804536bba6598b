//! Projects (a user's working directories) and the session summaries the web
//! UI lists under them. Every path a user has sessions in is a project, so
//! the list is the `projects` table plus those paths (rows are added for
//! them on the way).

use diesel::prelude::*;

use super::schema::{projects, sessions};
use super::{history, now, per_backend, write_transaction, AnyConnection, DbError, Session};

#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = projects)]
pub struct Project {
    pub id: i32,
    #[allow(dead_code)] // selected with the row; queries filter by it
    pub user_id: i32,
    pub path: String,
    pub display_name: Option<String>,
    pub is_starred: bool,
    #[allow(dead_code)] // selected with the row
    pub created_at: String,
}

impl Project {
    /// Its name in the UI: the one given, else the folder's name.
    pub fn name(&self) -> String {
        display_name_of(self.display_name.as_deref(), &self.path)
    }
}

pub fn display_name_of(name: Option<&str>, path: &str) -> String {
    name.map(str::trim)
        .filter(|n| !n.is_empty())
        .map(str::to_string)
        .unwrap_or_else(|| {
            std::path::Path::new(path)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| path.to_string())
        })
}

/// The user's projects, oldest first, including every path they have sessions in.
pub fn projects_of(conn: &mut AnyConnection, user_id: i32) -> Result<Vec<Project>, DbError> {
    write_transaction(conn, |conn| {
        let known = projects::table
            .filter(projects::user_id.eq(user_id))
            .select(projects::path);
        let missing: Vec<String> = sessions::table
            .filter(sessions::user_id.eq(user_id))
            .filter(sessions::project_path.ne_all(known))
            .select(sessions::project_path)
            .distinct()
            .load(conn)?;
        for path in missing {
            add_if_missing(conn, user_id, &path, &now())?;
        }
        Ok(projects::table
            .filter(projects::user_id.eq(user_id))
            .order(projects::id.asc())
            .select(Project::as_select())
            .load(conn)?)
    })
}

/// Adds the user's project row for `path` unless there is one. Diesel's
/// `MultiConnection` has no `ON CONFLICT`, so this one statement is written
/// for each backend (both have `ON CONFLICT DO NOTHING`).
pub fn add_if_missing(
    conn: &mut AnyConnection,
    user_id: i32,
    path: &str,
    created_at: &str,
) -> Result<(), DbError> {
    macro_rules! insert {
        ($conn:expr) => {
            diesel::insert_into(projects::table)
                .values((
                    projects::user_id.eq(user_id),
                    projects::path.eq(path),
                    projects::created_at.eq(created_at),
                ))
                .on_conflict((projects::user_id, projects::path))
                .do_nothing()
                .execute($conn)
        };
    }
    per_backend!(conn, |c| insert!(c))?;
    Ok(())
}

pub fn project_by_id(
    conn: &mut AnyConnection,
    user_id: i32,
    id: i32,
) -> Result<Option<Project>, DbError> {
    Ok(projects::table
        .filter(projects::user_id.eq(user_id))
        .filter(projects::id.eq(id))
        .select(Project::as_select())
        .first(conn)
        .optional()?)
}

pub fn project_for_path(
    conn: &mut AnyConnection,
    user_id: i32,
    path: &str,
) -> Result<Option<Project>, DbError> {
    Ok(projects::table
        .filter(projects::user_id.eq(user_id))
        .filter(projects::path.eq(path))
        .select(Project::as_select())
        .first(conn)
        .optional()?)
}

/// Adds a project; `None` when the user already has one at `path`.
pub fn create_project(
    conn: &mut AnyConnection,
    user_id: i32,
    path: &str,
    display_name: Option<&str>,
) -> Result<Option<Project>, DbError> {
    write_transaction(conn, |conn| {
        if project_for_path(conn, user_id, path)?.is_some() {
            return Ok(None);
        }
        let now = now();
        Ok(Some(per_backend!(conn, |c| diesel::insert_into(
            projects::table
        )
        .values((
            projects::user_id.eq(user_id),
            projects::path.eq(path),
            projects::display_name.eq(display_name),
            projects::created_at.eq(&now),
        ))
        .returning(Project::as_returning())
        .get_result(c))?))
    })
}

/// A session as the project list shows it.
#[derive(Debug, Clone)]
pub struct SessionSummary {
    pub id: String,
    pub provider: String,
    pub summary: String,
    pub message_count: i64,
    pub last_activity: String,
    pub created_at: String,
}

/// Name (or first prompt) and message count of a session.
pub fn summary_of(conn: &mut AnyConnection, s: &Session) -> Result<SessionSummary, DbError> {
    let summary = match s.custom_name.as_deref().map(str::trim) {
        Some(name) if !name.is_empty() => name.to_string(),
        _ => history::first_prompt(conn, &s.id)?.unwrap_or_default(),
    };
    Ok(SessionSummary {
        id: s.id.clone(),
        provider: s.provider.clone(),
        summary,
        message_count: history::count(conn, &s.id)?,
        last_activity: s.updated_at.clone(),
        created_at: s.created_at.clone(),
    })
}

/// The user's sessions in `path`, most recently active first: one page and the total.
pub fn sessions_page(
    conn: &mut AnyConnection,
    user_id: i32,
    path: &str,
    limit: i64,
    offset: i64,
) -> Result<(Vec<SessionSummary>, i64), DbError> {
    let of_project = sessions::table
        .filter(sessions::user_id.eq(user_id))
        .filter(sessions::project_path.eq(path))
        .filter(sessions::archived.eq(false));
    let total: i64 = of_project.count().get_result(conn)?;
    let rows: Vec<Session> = of_project
        .order((sessions::updated_at.desc(), sessions::created_at.desc()))
        .limit(limit)
        .offset(offset)
        .select(Session::as_select())
        .load(conn)?;
    let summaries = rows
        .iter()
        .map(|s| summary_of(conn, s))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((summaries, total))
}

/// Flips the star of a project; its new state, or `None` when it is not the user's.
pub fn toggle_star(
    conn: &mut AnyConnection,
    user_id: i32,
    id: i32,
) -> Result<Option<bool>, DbError> {
    write_transaction(conn, |conn| {
        let Some(p) = project_by_id(conn, user_id, id)? else {
            return Ok(None);
        };
        diesel::update(projects::table.find(id))
            .set(projects::is_starred.eq(!p.is_starred))
            .execute(conn)?;
        Ok(Some(!p.is_starred))
    })
}

/// Names a project (`None` goes back to the folder's name); false when it is not the user's.
pub fn rename(
    conn: &mut AnyConnection,
    user_id: i32,
    id: i32,
    name: Option<&str>,
) -> Result<bool, DbError> {
    let changed = diesel::update(
        projects::table
            .filter(projects::id.eq(id))
            .filter(projects::user_id.eq(user_id)),
    )
    .set(projects::display_name.eq(name))
    .execute(conn)?;
    Ok(changed == 1)
}
