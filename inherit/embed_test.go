package inherit

import (
	"bufio"
	"io"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/seed6cb0314a/upgrader/internal/handoff"
	"github.com/seed6cb0314a/upgrader/internal/testnet"
)

// directPair makes the two Handoffs of embedded mode over one channel: the
// parent's, sender only, and the child's, taking kinds, which answers the
// parent itself with no upgrader between them.
func directPair(t *testing.T, kinds ...string) (parent, child *Handoffs) {
	t.Helper()
	return directPairLate(t, lateHandoff, kinds...)
}

// directPairLate is directPair with the child's bound on a HANDOFF's wait
// in its queue.
func directPairLate(t *testing.T, late time.Duration, kinds ...string) (parent, child *Handoffs) {
	t.Helper()
	sa, sb := channelEnds(t)
	log := slog.New(slog.DiscardHandler)
	var err error
	if parent, err = newHandoffs(sa, nil, log); err != nil {
		t.Fatal(err)
	}
	if child, err = startHandoffs(sb, kinds, log, knobs{late: late, sendTimeout: SendTimeout}); err != nil {
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

	sc, cc := testnet.TCPPair(t)
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

// A HANDOFF that waited in the taker's queue past its bound (here 1 ns,
// so any) is refused, its fds closed there: the sender, which takes back
// what has no answer within SendTimeout, keeps the connection and serves
// it, and no second process holds it.
func TestLateHandoffIsRefused(t *testing.T) {
	sender, taker := directPairLate(t, time.Nanosecond, KindHTTP)
	sc, cc := testnet.TCPPair(t)
	err := sender.Send(KindHTTP, []Outgoing{{Conn: sc}})
	if err == nil || !strings.Contains(err.Error(), "waited") {
		t.Fatalf("late handoff: %v, want a refusal that says it waited", err)
	}
	if n := taker.Listener(KindHTTP).Pending(); n != 0 {
		t.Fatalf("the taker holds %d connections, want none", n)
	}
	// Still the sender's: it answers on it, and the client reads EOF once
	// it closes, which it would not if the taker held a copy.
	io.WriteString(sc, "ok")
	sc.Close()
	cc.SetReadDeadline(time.Now().Add(10 * time.Second))
	got, err := io.ReadAll(cc)
	if err != nil || string(got) != "ok" {
		t.Fatalf("client read %q, %v; want the sender's answer, then EOF", got, err)
	}
}

// The bound is on the time a HANDOFF waited in the taker's socket, as the
// kernel stamped it: one sent before the taker reads, and left to age past
// the bound, is refused; one read at once within the same bound is taken.
func TestHandoffWaitIsMeasuredInTheQueue(t *testing.T) {
	up, sb := channelEnds(t)
	if err := sb.StampArrivals(); err != nil {
		t.Fatal(err)
	}
	const bound = 100 * time.Millisecond
	sc, _ := testnet.TCPPair(t)
	sendHandoff(t, up, 1, KindHTTP, sc, handoff.Conn{})
	// The batch must age in the queue past the bound: the wait is the
	// stimulus, not a wait for a state.
	time.Sleep(2 * bound)
	taker, err := startHandoffs(sb, []string{KindHTTP}, slog.New(slog.DiscardHandler), knobs{late: bound, sendTimeout: SendTimeout})
	if err != nil {
		t.Fatal(err)
	}
	defer taker.Close()
	if m, _ := recv(t, up); m.Type != handoff.TypeAccept {
		t.Fatalf("first message %+v, want ACCEPT", m)
	}
	if m, _ := recv(t, up); m.Type != handoff.TypeNak || m.ID != 1 || !strings.Contains(m.Reason, "waited") {
		t.Fatalf("answer to the aged batch %+v, want NAK id=1 saying it waited", m)
	}
	sc2, _ := testnet.TCPPair(t)
	sendHandoff(t, up, 2, KindHTTP, sc2, handoff.Conn{})
	if m, _ := recv(t, up); m.Type != handoff.TypeAck || m.ID != 2 {
		t.Fatalf("answer to a batch read at once %+v, want ACK id=2", m)
	}
}
