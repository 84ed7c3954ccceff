package inherit

import "net"

// Handoff hands one connection of the application's own protocol, with
// its state and any bytes read but not consumed, to a ready worker of the
// newest generation that took kind, and closes it here once that worker
// has it (docs/reference/handoff.md). On ErrUnanswered it has closed it
// here too (that worker may own it; Send says why). On any other error the
// connection is untouched and still the caller's to serve or close; the
// error is ErrNoHandoff on a nil Handoffs.
func (h *Handoffs) Handoff(conn net.Conn, kind string, state, buffered []byte) error {
	err := h.Send(kind, []Outgoing{{Conn: conn, State: state, Buffered: buffered}})
	if err == ErrUnanswered {
		conn.Close()
	}
	if err != nil {
		return err
	}
	return conn.Close()
}

// StateOf returns the kind and state a handed-off connection came with;
// ok is false for a connection accepted from a listener.
func StateOf(c net.Conn) (kind string, state []byte, ok bool) {
	hc, ok := c.(*Conn)
	if !ok {
		return "", nil, false
	}
	return hc.Kind, hc.State, true
}
