"""One module per wire protocol; each holds only what that protocol does per connection."""
