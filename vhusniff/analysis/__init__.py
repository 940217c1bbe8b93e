"""Understanding a session: negotiated state per connection, request/reply matching, expert checks, and the
difference between two captures. Sans-io: records in, findings and state out."""
