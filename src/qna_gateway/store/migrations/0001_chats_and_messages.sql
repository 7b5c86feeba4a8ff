-- Chats and their messages. `seq` orders rows and backs the opaque pagination cursors,
-- since several rows can share one `created_at` (a question and its answer are one transaction).
CREATE TABLE chats (
    id          uuid PRIMARY KEY,
    seq         bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    principal   text NOT NULL,
    title       text,
    metadata    jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX chats_principal_seq ON chats (principal, seq DESC);

-- Gateway processes alive now; a turn's owner is one of them. A row whose heartbeat is
-- stale belongs to a process that died, and its turns are ended `interrupted` (`crash`).
CREATE TABLE gateway_instances (
    id            uuid PRIMARY KEY,
    hostname      text NOT NULL,
    pid           integer NOT NULL,
    started_at    timestamptz NOT NULL DEFAULT now(),
    heartbeat_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE messages (
    id             uuid PRIMARY KEY,
    seq            bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    chat_id        uuid NOT NULL REFERENCES chats (id) ON DELETE CASCADE,
    role           text NOT NULL CHECK (role IN ('user', 'assistant')),
    content        text NOT NULL DEFAULT '',
    status         text NOT NULL
                   CHECK (status IN ('streaming', 'completed', 'failed', 'cancelled', 'interrupted')),
    finish_reason  text,
    error          text,
    model          text,
    input_tokens   integer,
    output_tokens  integer,
    sources        jsonb,
    owner_id       uuid,
    watched_at     timestamptz,
    created_at     timestamptz NOT NULL DEFAULT now(),
    completed_at   timestamptz
);
CREATE INDEX messages_chat_seq ON messages (chat_id, seq);
-- One answer at a time per chat, enforced by PostgreSQL so it holds across replicas.
CREATE UNIQUE INDEX messages_one_streaming_per_chat ON messages (chat_id) WHERE status = 'streaming';
CREATE INDEX messages_streaming_owner ON messages (owner_id) WHERE status = 'streaming';
