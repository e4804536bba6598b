DROP TABLE sessions;
DROP TABLE projects;
DROP TABLE users;
