package inherit

import (
	"bufio"
	"io"
	"log/slog"
	"testing"

	"github.com/seed6cb0314a/upgrader/internal/handoff"
)

// directPair makes the two Handoffs of embedded mode over one channel: the
// parent's, sender only, and the child's, taking kinds, which answers the
// parent itself with no upgrader between them.
func directPair(t *testing.T, kinds ...string) (parent, child *Handoffs) {
	t.Helper()
	a, b, err := handoff.Pair()
	if err != nil {
		t.Fatal(err)
	}
	sa, err := handoff.NewSocket(a)
	if err != nil {
		t.Fatal(err)
	}
	sb, err := handoff.NewSocket(b)
	if err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.DiscardHandler)
	if parent, err = newHandoffs(sa, nil, log); err != nil {
		t.Fatal(err)
	}
	if child, err = newHandoffs(sb, kinds, log); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { parent.Close(); child.Close() })
	return parent, child
}

// In embedded mode the draining process's Handoffs (the channel from its
// own parent, or none) sends through the channel to its child once it has
// upgraded: the child takes an idle HTTP connection and answers ACK, and a
// kind it does not take is refused with NAK, the connection still the
// sender's.
func TestEmbeddedSendGoesToTheChild(t *testing.T) {
	own, _ := directPair(t)
	toChild, child := directPair(t, KindHTTP)
	own.out.Store(toChild)

	sc, cc := tcpPair(t)
	if err := own.Send("counter", []Outgoing{{Conn: sc}}); err == nil {
		t.Fatal("a kind the child does not take was acknowledged")
	}
	if err := own.Send(KindHTTP, []Outgoing{{Conn: sc}}); err != nil {
		t.Fatalf("handoff to the child: %v", err)
	}
	sc.Close()
	io.WriteString(cc, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
	c := accept(t, child.Listener(KindHTTP))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil || line != "GET / HTTP/1.1\r\n" {
		t.Fatalf("the child read %q, %v", line, err)
	}
	c.Close()
}
