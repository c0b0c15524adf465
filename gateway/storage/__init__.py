"""Object storage (S3) access."""
