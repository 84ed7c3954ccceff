// Package handoff is the wire protocol that moves live connections between
// a draining worker and a ready one, through upgrader: SOCK_SEQPACKET
// messages (unix(7)) with a text header and, for HANDOFF, the connections'
// fds as SCM_RIGHTS. docs/handoff.md is the specification for workers in
// other languages.
//
//	UPGRADER/1 ACCEPT kinds=http,counter
//	UPGRADER/1 HANDOFF id=7 kind=http n=2
//	state=0 buffered=0
//	state=5 buffered=3
//	<blank line>
//	<state of conn 1><buffered of conn 1><state of conn 2>…
//	UPGRADER/1 ACK id=7
//	UPGRADER/1 NAK id=7 reason=no ready worker takes kind http
package handoff

import (
	"bytes"
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// Limits of the protocol.
const (
	// MaxFDs is the most connections in one HANDOFF: the kernel's SCM_MAX_FD.
	MaxFDs = 253
	// MaxState bounds one connection's application state, in bytes.
	MaxState = 64 << 10
	// MaxBuffered bounds the bytes a sender had read but not consumed.
	MaxBuffered = 64 << 10
	// MaxMessage bounds one message, header and payload, in bytes.
	MaxMessage = 192 << 10
	magic      = "UPGRADER/1 "
)

// Message types.
const (
	TypeAccept  = "ACCEPT"
	TypeHandoff = "HANDOFF"
	TypeAck     = "ACK"
	TypeNak     = "NAK"
)

// Conn is one connection's metadata in a HANDOFF; its fd travels separately.
type Conn struct {
	// State is application state the receiver resumes from (may be empty).
	State []byte
	// Buffered are bytes the sender read from the connection but did not
	// consume: the receiver must see them before anything read from the fd.
	Buffered []byte
}

// Message is one protocol message.
type Message struct {
	Type   string
	ID     uint64   // HANDOFF, ACK, NAK
	Kind   string   // HANDOFF
	Kinds  []string // ACCEPT
	Reason string   // NAK
	Conns  []Conn   // HANDOFF; len(Conns) is the number of fds
}

// ValidKind reports whether k is a valid kind: 1 to 32 of [a-z0-9._-].
func ValidKind(k string) bool {
	if len(k) == 0 || len(k) > 32 {
		return false
	}
	for _, c := range []byte(k) {
		if !('a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '.' || c == '_' || c == '-') {
			return false
		}
	}
	return true
}

// Encode renders m. It returns an error for a message the receiver would
// refuse (bad kind, too many connections, state or message too large).
func Encode(m Message) ([]byte, error) {
	var b bytes.Buffer
	b.WriteString(magic)
	switch m.Type {
	case TypeAccept:
		for _, k := range m.Kinds {
			if !ValidKind(k) {
				return nil, fmt.Errorf("handoff: kind %q is not 1-32 of [a-z0-9._-]", k)
			}
		}
		fmt.Fprintf(&b, "ACCEPT kinds=%s\n", strings.Join(m.Kinds, ","))
	case TypeAck:
		fmt.Fprintf(&b, "ACK id=%d\n", m.ID)
	case TypeNak:
		fmt.Fprintf(&b, "NAK id=%d reason=%s\n", m.ID, strings.ReplaceAll(m.Reason, "\n", " "))
	case TypeHandoff:
		if !ValidKind(m.Kind) {
			return nil, fmt.Errorf("handoff: kind %q is not 1-32 of [a-z0-9._-]", m.Kind)
		}
		if len(m.Conns) == 0 || len(m.Conns) > MaxFDs {
			return nil, fmt.Errorf("handoff: %d connections in one message, want 1 to %d", len(m.Conns), MaxFDs)
		}
		fmt.Fprintf(&b, "HANDOFF id=%d kind=%s n=%d\n", m.ID, m.Kind, len(m.Conns))
		for _, c := range m.Conns {
			if len(c.State) > MaxState || len(c.Buffered) > MaxBuffered {
				return nil, fmt.Errorf("handoff: state of %d or buffered %d bytes over the limits (%d, %d)", len(c.State), len(c.Buffered), MaxState, MaxBuffered)
			}
			fmt.Fprintf(&b, "state=%d buffered=%d\n", len(c.State), len(c.Buffered))
		}
		b.WriteString("\n")
		for _, c := range m.Conns {
			b.Write(c.State)
			b.Write(c.Buffered)
		}
	default:
		return nil, fmt.Errorf("handoff: unknown message type %q", m.Type)
	}
	if b.Len() > MaxMessage {
		return nil, fmt.Errorf("handoff: message of %d bytes over %d", b.Len(), MaxMessage)
	}
	return b.Bytes(), nil
}

// ErrMalformed wraps every Parse error.
var ErrMalformed = errors.New("malformed handoff message")

// Parse parses one message. nfds is the number of fds that came with it:
// a HANDOFF must carry exactly n, any other message none. Errors wrap
// ErrMalformed and quote the offending input.
func Parse(b []byte, nfds int) (Message, error) {
	bad := func(format string, a ...any) (Message, error) {
		return Message{}, fmt.Errorf("%w: "+format, append([]any{ErrMalformed}, a...)...)
	}
	if len(b) > MaxMessage {
		return bad("%d bytes, over %d", len(b), MaxMessage)
	}
	line, rest, ok := bytes.Cut(b, []byte("\n"))
	if !ok {
		return bad("header %.60q has no newline", b)
	}
	head, ok := strings.CutPrefix(string(line), magic)
	if !ok {
		return bad("header %.60q does not start with %q", line, magic)
	}
	typ, args, _ := strings.Cut(head, " ")
	m := Message{Type: typ}
	if typ != TypeHandoff && nfds != 0 {
		return bad("%s message carried %d fds", typ, nfds)
	}
	if typ != TypeHandoff && len(rest) != 0 {
		return bad("%s message has %d bytes after its header line", typ, len(rest))
	}
	fields := map[string]string{}
	if typ == TypeNak {
		// reason= runs to the end of the line.
		var reason string
		var found bool
		args, reason, found = strings.Cut(args, " reason=")
		if !found {
			return bad("NAK %.60q has no reason=", head)
		}
		m.Reason = reason
	}
	for _, kv := range strings.Fields(args) {
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			return bad("field %.40q in %.60q is not key=value", kv, head)
		}
		if _, dup := fields[k]; dup {
			return bad("field %q repeated in %.60q", k, head)
		}
		fields[k] = v
	}
	need := func(keys ...string) error {
		for _, k := range keys {
			if _, ok := fields[k]; !ok {
				return fmt.Errorf("%w: %s %.60q lacks %s=", ErrMalformed, typ, head, k)
			}
		}
		if len(fields) != len(keys) {
			return fmt.Errorf("%w: %s %.60q has fields other than %v", ErrMalformed, typ, head, keys)
		}
		return nil
	}
	parseID := func() error {
		id, err := strconv.ParseUint(fields["id"], 10, 64)
		if err != nil {
			return fmt.Errorf("%w: id %q is not a number", ErrMalformed, fields["id"])
		}
		m.ID = id
		return nil
	}
	switch typ {
	case TypeAccept:
		if err := need("kinds"); err != nil {
			return Message{}, err
		}
		if fields["kinds"] != "" {
			for _, k := range strings.Split(fields["kinds"], ",") {
				if !ValidKind(k) {
					return bad("kind %.40q is not 1-32 of [a-z0-9._-]", k)
				}
				m.Kinds = append(m.Kinds, k)
			}
		}
		return m, nil
	case TypeAck, TypeNak:
		if err := need("id"); err != nil {
			return Message{}, err
		}
		if err := parseID(); err != nil {
			return Message{}, err
		}
		return m, nil
	case TypeHandoff:
		if err := need("id", "kind", "n"); err != nil {
			return Message{}, err
		}
		if err := parseID(); err != nil {
			return Message{}, err
		}
		m.Kind = fields["kind"]
		if !ValidKind(m.Kind) {
			return bad("kind %.40q is not 1-32 of [a-z0-9._-]", m.Kind)
		}
		n, err := strconv.Atoi(fields["n"])
		if err != nil || n < 1 || n > MaxFDs {
			return bad("n=%.20q is not 1 to %d", fields["n"], MaxFDs)
		}
		if n != nfds {
			return bad("n=%d but %d fds came with the message", n, nfds)
		}
		sizes := make([][2]int, n)
		for i := range n {
			var l []byte
			l, rest, ok = bytes.Cut(rest, []byte("\n"))
			if !ok {
				return bad("connection line %d missing", i+1)
			}
			var st, bu int
			if c, err := fmt.Sscanf(string(l), "state=%d buffered=%d", &st, &bu); err != nil || c != 2 ||
				fmt.Sprintf("state=%d buffered=%d", st, bu) != string(l) {
				return bad("connection line %.60q is not state=N buffered=N", l)
			}
			if st < 0 || st > MaxState || bu < 0 || bu > MaxBuffered {
				return bad("connection line %.60q over the limits (%d, %d)", l, MaxState, MaxBuffered)
			}
			sizes[i] = [2]int{st, bu}
		}
		rest, ok = bytes.CutPrefix(rest, []byte("\n"))
		if !ok {
			return bad("no blank line after the connection lines")
		}
		for _, sz := range sizes {
			if len(rest) < sz[0]+sz[1] {
				return bad("payload is %d bytes short", sz[0]+sz[1]-len(rest))
			}
			m.Conns = append(m.Conns, Conn{State: rest[:sz[0]:sz[0]], Buffered: rest[sz[0] : sz[0]+sz[1] : sz[0]+sz[1]]})
			rest = rest[sz[0]+sz[1]:]
		}
		if len(rest) != 0 {
			return bad("%d bytes after the payload", len(rest))
		}
		return m, nil
	}
	return bad("unknown message type %.20q", typ)
}
