"""qna-gateway: a streaming Q&A chat gateway on PostgreSQL."""

__version__ = "0.1.0"
