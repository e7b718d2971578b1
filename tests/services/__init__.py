"""The slow tier on real services: PostgreSQL and SeaweedFS S3 started by the tests (issue 15)."""
