package nodeipc

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/seed6cb0314a/upgrader/internal/handoff"
)

// startNode runs script under a real Node.js with our channel at
// NODE_CHANNEL_FD=3, as child_process.fork() would, and returns our end.
func startNode(t *testing.T, script string, env ...string) *Channel {
	t.Helper()
	node, err := exec.LookPath("node")
	if err != nil {
		t.Fatalf("these tests need Node.js (node on PATH): %v", err)
	}
	ours, theirs, err := Pair()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(node, "-e", script)
	cmd.ExtraFiles = []*os.File{theirs}
	cmd.Env = append(os.Environ(), append(env, EnvChannelFD+"=3", EnvSerialization+"="+SerializationJSON)...)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	theirs.Close()
	conn, err := NewConn(ours)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		conn.Close()
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-done
			t.Error("node did not exit when its channel closed")
		}
	})
	return &Channel{Conn: conn}
}

// recv is Recv with a bound, failing the test on an error.
func recv(t *testing.T, ch *Channel) Incoming {
	t.Helper()
	type r struct {
		in  Incoming
		err error
	}
	c := make(chan r, 1)
	go func() { in, err := ch.Recv(); c <- r{in, err} }()
	select {
	case got := <-c:
		if got.err != nil {
			t.Fatalf("Recv: %v", got.err)
		}
		return got.in
	case <-time.After(10 * time.Second):
		t.Fatal("Recv: nothing within 10 s")
	}
	return Incoming{}
}

func TestNodeSendsNotifyMessages(t *testing.T) {
	ch := startNode(t, `
process.send({upgrader: 'status', text: 'warming\nup'});
process.send({hello: 'not upgrader\'s'});
process.send({upgrader: 'ready'});
process.send({upgrader: 'accept', kinds: ['http', 'counter']});
process.send({upgrader: 'stopping'}, () => process.disconnect());
`)
	want := []string{"STATUS=warming up", "READY=1"}
	for _, w := range want {
		in := recv(t, ch)
		if len(in.Notify) != 1 || in.Notify[0].Key+"="+in.Notify[0].Value != w {
			t.Fatalf("got %+v, want %s", in, w)
		}
	}
	in := recv(t, ch)
	if in.Handoff == nil || in.Handoff.Type != handoff.TypeAccept || strings.Join(in.Handoff.Kinds, ",") != "http,counter" {
		t.Fatalf("got %+v, want ACCEPT http,counter", in)
	}
	if in := recv(t, ch); !in.Notify.Is("STOPPING", "1") {
		t.Fatalf("got %+v, want STOPPING=1", in)
	}
}

// TestNodeHandsOffASocket: a socket a Node.js server accepted comes with
// its handoff message, and Node's queue behind it moves (we ACKed it).
func TestNodeHandsOffASocket(t *testing.T) {
	ch := startNode(t, fmt.Sprintf(`
const net = require('net');
const srv = net.createServer({pauseOnConnect: true}, (s) => {
  process.send({upgrader: 'handoff', id: 7, kind: 'http', state: Buffer.from('st').toString('base64'),
                buffered: Buffer.from('GET').toString('base64')}, s, {keepOpen: true});
  process.send({upgrader: 'handoff', id: 8, kind: 'http'}); // no socket: refused
  process.on('message', (m) => {
    if (m.upgrader === 'ack' && m.id === 7) {
      s.destroy();
      srv.close(() => process.send({upgrader: 'status', text: 'closed'}, () => process.disconnect()));
    }
  });
});
srv.listen(0, '127.0.0.1', () => process.send({upgrader: 'status', text: String(srv.address().port)}));
`))
	in := recv(t, ch)
	client, err := net.Dial("tcp", "127.0.0.1:"+in.Notify[0].Value)
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	in = recv(t, ch)
	if err != nil || in.Handoff == nil || in.Handoff.Type != handoff.TypeHandoff || in.Handoff.ID != 7 || len(in.FDs) != 1 {
		t.Fatalf("got %+v, %v; want handoff id 7 with one fd", in, err)
	}
	if c := in.Handoff.Conns[0]; string(c.State) != "st" || string(c.Buffered) != "GET" {
		t.Fatalf("state %q buffered %q", c.State, c.Buffered)
	}
	// id 8 was queued behind the handle in Node until our ACK.
	if _, err := ch.Recv(); !errors.Is(err, ErrMalformed) {
		t.Fatalf("a handoff with no socket: %v, want an error wrapping ErrMalformed", err)
	}
	taken := os.NewFile(uintptr(in.FDs[0]), "taken")
	defer taken.Close()
	if err := ch.Send(handoff.Message{Type: handoff.TypeAck, ID: 7}, nil); err != nil {
		t.Fatal(err)
	}
	// The client's connection is ours now: Node destroyed its copy.
	if _, err := client.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 4)
	if _, err := io.ReadFull(taken, b); err != nil || string(b) != "ping" {
		t.Fatalf("read %q, %v from the handed-off socket", b, err)
	}
	// server.close() did not wait on the socket it sent us.
	if in := recv(t, ch); !in.Notify.Is("STATUS", "closed") {
		t.Fatalf("got %+v, want the server closed", in)
	}
}

// TestSendHandsSocketsToNode: a batch of two connections reaches a Node.js
// taker as two messages with their sockets, and Send returns once Node
// holds both.
func TestSendHandsSocketsToNode(t *testing.T) {
	ch := startNode(t, `
let n = 0;
process.on('message', (m, s) => {
  if (m.upgrader !== 'handoff' || !s) return;
  s.write(m.id + ':' + Buffer.from(m.buffered, 'base64') + '\n');
  s.end();
  if (++n === 2) process.send({upgrader: 'status', text: 'done'}, () => process.disconnect());
});
process.send({upgrader: 'ready'});
`)
	recv(t, ch)
	// Node's NODE_HANDLE_ACKs come in through Recv.
	status := make(chan Incoming, 1)
	go func() {
		for {
			in, err := ch.Recv()
			if err != nil {
				return
			}
			status <- in
		}
	}()
	var fds []int
	var peers []*os.File
	for i := 0; i < 2; i++ {
		p, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		fds = append(fds, p[0])
		peers = append(peers, os.NewFile(uintptr(p[1]), "peer"))
	}
	m := handoff.Message{Type: handoff.TypeHandoff, ID: 42, Kind: "http",
		Conns: []handoff.Conn{{Buffered: []byte("a")}, {Buffered: []byte("b")}}}
	if err := ch.Send(m, fds); err != nil {
		t.Fatal(err)
	}
	handoff.CloseFDs(fds)
	for i, p := range peers {
		line, err := bufio.NewReader(p).ReadString('\n')
		if want := fmt.Sprintf("42:%c\n", 'a'+i); err != nil || line != want {
			t.Fatalf("peer %d read %q, %v; want %q", i, line, err, want)
		}
		p.Close()
	}
	select {
	case in := <-status:
		if !in.Notify.Is("STATUS", "done") {
			t.Fatalf("got %+v", in)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no status from the taker")
	}
}

// rawPeer is a Conn with the test on the other end, writing raw lines.
func rawPeer(t *testing.T) (*Channel, *net.UnixConn) {
	t.Helper()
	ours, theirs, err := Pair()
	if err != nil {
		t.Fatal(err)
	}
	conn, err := NewConn(ours)
	if err != nil {
		t.Fatal(err)
	}
	fc, err := net.FileConn(theirs)
	theirs.Close()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close(); fc.Close() })
	return &Channel{Conn: conn}, fc.(*net.UnixConn)
}

// TestBadInputKeepsTheChannel: garbage, over-long lines, handles of the
// wrong type, fds with no NODE_HANDLE and bad fields are each dropped,
// answered as Node expects, and the next good message still arrives.
func TestBadInputKeepsTheChannel(t *testing.T) {
	ch, peer := rawPeer(t)
	answers := bufio.NewReader(peer)
	p, _ := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	defer unix.Close(p[1])
	write := func(s string, fd int) {
		t.Helper()
		var oob []byte
		if fd >= 0 {
			oob = unix.UnixRights(fd)
		}
		if fd < 0 { // Write writes it all; WriteMsgUnix may stop short
			if _, err := peer.Write([]byte(s)); err != nil {
				t.Fatal(err)
			}
			return
		}
		if n, _, err := peer.WriteMsgUnix([]byte(s), oob, nil); err != nil || n != len(s) {
			t.Fatal(n, err)
		}
	}
	expectAnswer := func(want string) string {
		t.Helper()
		peer.SetReadDeadline(time.Now().Add(5 * time.Second))
		line, err := answers.ReadString('\n')
		if err != nil || !strings.Contains(line, want) {
			t.Fatalf("answer %q, %v; want one with %s", line, err, want)
		}
		return line
	}
	go func() {
		malformed := 0
		for {
			in, err := ch.Recv()
			if err != nil && !errors.Is(err, ErrMalformed) {
				return
			}
			if err != nil {
				t.Log(err)
				malformed++
				continue
			}
			if in.Notify.Is("READY", "1") {
				ch.Conn.Send(map[string]int{"malformed": malformed})
				return
			}
		}
	}()
	write("not json\n", -1)
	write(`{"upgrader":"handoff","id":3,"kind":"http"}`+"\n", p[0]) // fd with no NODE_HANDLE: kept loose
	expectAnswer(`"nak","id":3`)
	write(`{"cmd":"NODE_HANDLE","type":"net.Socket","msg":{"upgrader":"handoff","id":4,"kind":"BAD KIND"}}`+"\n", -1)
	expectAnswer(CmdHandleAck) // claims the loose fd
	expectAnswer(`"nak","id":4`)
	write(`{"cmd":"NODE_HANDLE","type":"net.Socket","msg":{"upgrader":"handoff","id":5,"kind":"http"}}`+"\n", -1)
	expectAnswer(CmdHandleNack) // no fd came
	expectAnswer(`"nak","id":5`)
	write(`{"cmd":"NODE_HANDLE","type":"net.Server","msg":{}}`+"\n", p[0])
	expectAnswer(CmdHandleAck)
	write(`{"upgrader":"handoff","id":1e99,"kind":"http"}`+"\n", -1)
	write(`{"upgrader":"what"}`+"\n", -1)
	write(`{"upgrader":"accept","kinds":["Nope"]}`+"\n", -1)
	write(`{"upgrader":"accept","kinds":"http"}`+"\n", -1)
	write(`{"cmd":"NODE_SOCKET_GET_COUNT","key":"k1"}`+"\n", -1)
	expectAnswer(`"count":0`)
	write(`{"cmd":"NODE_HANDLE_ACK"}`+"\n", -1) // unasked: ignored
	write("{"+strings.Repeat(" ", MaxLine+10)+"\n", -1)
	write(`{"upgrader":"ready"}`+"\n", -1)
	line := expectAnswer(`"malformed":`)
	// not json, id 3 (no socket), id 4, id 5, net.Server, 1e99, "what",
	// kind Nope, kinds not a list, the long line.
	var m map[string]int
	if err := json.Unmarshal([]byte(line), &m); err != nil || m["malformed"] != 10 {
		t.Fatalf("%s: want 10 malformed messages", line)
	}
}
