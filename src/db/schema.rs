// Mirrors migrations/ (kept by hand: the diesel CLI is not needed to build).

diesel::table! {
    users (id) {
        id -> Integer,
        username -> Text,
        password_hash -> Nullable<Text>,
        created_at -> Text,
        token_version -> Integer,
        is_admin -> Bool,
    }
}

diesel::table! {
    projects (id) {
        id -> Integer,
        user_id -> Integer,
        path -> Text,
        display_name -> Nullable<Text>,
        is_starred -> Bool,
        created_at -> Text,
    }
}

diesel::table! {
    sessions (id) {
        id -> Text,
        user_id -> Integer,
        provider -> Text,
        provider_session_id -> Nullable<Text>,
        project_path -> Text,
        custom_name -> Nullable<Text>,
        archived -> Bool,
        last_seq -> BigInt,
        created_at -> Text,
        updated_at -> Text,
        seq_reserved -> BigInt,
    }
}

diesel::table! {
    messages (id) {
        id -> Integer,
        session_id -> Text,
        kind -> Text,
        role -> Nullable<Text>,
        tool_id -> Nullable<Text>,
        body -> Text,
        created_at -> Text,
    }
}

diesel::joinable!(projects -> users (user_id));
diesel::joinable!(sessions -> users (user_id));
diesel::joinable!(messages -> sessions (session_id));
diesel::allow_tables_to_appear_in_same_query!(users, projects, sessions, messages);
