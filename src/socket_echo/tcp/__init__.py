"""TCP (and Unix-socket) stream data paths over one connection lifecycle (lifecycle.py).

- native.py: the ready loop in a C thread (_native.c), where the extension is built (Linux);
- epoll.py: a nested epoll in the event loop, one callback for every ready connection (Linux);
- protocol.py: an asyncio Protocol per connection (any platform; behind every gate);
- accept.py: accepting in batches, pausing when descriptors run out.
"""
