-- The knowledge base: documents (with a content hash so a sync touches only what changed)
-- and their chunks, searched with full-text search and, for near-misses, trigram similarity.
CREATE EXTENSION IF NOT EXISTS pg_trgm;

CREATE TABLE kb_documents (
    path          text PRIMARY KEY,
    title         text NOT NULL,
    content_hash  text NOT NULL,
    size_bytes    integer NOT NULL,
    synced_at     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE kb_chunks (
    document  text NOT NULL REFERENCES kb_documents (path) ON DELETE CASCADE,
    chunk     integer NOT NULL,
    title     text NOT NULL,
    heading   text NOT NULL DEFAULT '',
    content   text NOT NULL,
    tsv       tsvector GENERATED ALWAYS AS (
                  setweight(to_tsvector('english', title), 'A')
                  || setweight(to_tsvector('english', heading), 'B')
                  || setweight(to_tsvector('english', content), 'C')
              ) STORED,
    PRIMARY KEY (document, chunk)
);
CREATE INDEX kb_chunks_tsv ON kb_chunks USING gin (tsv);
CREATE INDEX kb_chunks_trgm ON kb_chunks USING gin ((title || ' ' || heading || ' ' || content) gin_trgm_ops);

-- Tool calls and results of an answer, each at the text offset where it happened, so a
-- resumed stream replays them in place.
ALTER TABLE messages ADD COLUMN tool_events jsonb NOT NULL DEFAULT '[]'::jsonb;
