package control

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"
)

func TestParseRequest(t *testing.T) {
	if r, err := ParseRequest([]byte(`{"command":"upgrade","wait":true}`)); err != nil || r.Command != "upgrade" || !r.Wait {
		t.Fatalf("%+v %v", r, err)
	}
	for in, want := range map[string]string{
		`reboot`:                       "not a JSON request object",
		`{"command":"reboot"}`:         `unknown command "reboot"`,
		`{}`:                           "no command",
		`{"command":"status","x":1}`:   `unknown field "x"`,
		`{"command":"status"} {"a":1}`: "trailing data",
		`{"command":["status"]}`:       "not a JSON request object",
	} {
		_, err := ParseRequest([]byte(in))
		if err == nil || !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), "control request") {
			t.Errorf("ParseRequest(%q) = %v, want an error naming it and %q", in, err, want)
		}
	}
}

func FuzzParseRequest(f *testing.F) {
	for _, s := range []string{`{"command":"status"}`, `{"command":"upgrade","wait":true}`, `{`, `null`, `[]`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := ParseRequest(b)
		if err == nil && r.Command != "upgrade" && r.Command != "status" {
			t.Fatalf("accepted command %q", r.Command)
		}
		if err != nil && !strings.Contains(err.Error(), "control request") {
			t.Fatalf("error %q does not name the input", err)
		}
	})
}

func TestServeAndDo(t *testing.T) {
	path := filepath.Join(t.TempDir(), "c.sock")
	l, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	handler := func(ctx context.Context, r Request, send func(any) error) error {
		if r.Command == "status" {
			send(map[string]int{"n": 1})
			return send(map[string]int{"n": 2})
		}
		return errors.New("upgrade refused: stopping")
	}
	served := make(chan struct{})
	go func() {
		defer close(served)
		Serve(ctx, l, handler, zaptest.NewLogger(t))
	}()
	var got []int
	err = Do(ctx, path, Request{Command: "status"}, func(b []byte) error {
		var m map[string]int
		json.Unmarshal(b, &m)
		got = append(got, m["n"])
		return nil
	})
	if err != nil || len(got) != 2 || got[1] != 2 {
		t.Fatalf("status: %v %v", got, err)
	}
	err = Do(ctx, path, Request{Command: "upgrade"}, func([]byte) error { return nil })
	if err == nil || err.Error() != "upgrade refused: stopping" {
		t.Fatalf("an error reply came back as %v", err)
	}
	// A second supervisor may not take a live control socket over.
	if _, err := Listen(path); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Fatalf("Listen on a live socket: %v", err)
	}
	cancel()
	<-served // Serve returns once the listener is closed
	if err := Do(context.Background(), path, Request{Command: "status"}, func([]byte) error { return nil }); err == nil || !strings.Contains(err.Error(), "no upgrader answers") {
		t.Fatalf("after close: %v", err)
	}
}

// Connections beyond MaxConns are answered with an error at once, not
// held: each would be an fd the supervisor's workers need. Once one of
// the served ones is done, a request is answered again.
func TestServeBoundsConnections(t *testing.T) {
	path := filepath.Join(t.TempDir(), "c.sock")
	l, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go Serve(ctx, l, func(ctx context.Context, r Request, send func(any) error) error {
		return send(map[string]string{"state": "fine"})
	}, zaptest.NewLogger(t))
	// Connections that send nothing are held until requestTimeout.
	var held []net.Conn
	for range MaxConns {
		c, err := net.Dial("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		held = append(held, c)
	}
	dctx, dcancel := context.WithTimeout(ctx, 5*time.Second)
	defer dcancel()
	err = Do(dctx, path, Request{Command: "status"}, func([]byte) error { return nil })
	if err == nil || !strings.Contains(err.Error(), "connections already being served") {
		t.Fatalf("a request beyond %d connections: %v, want refused at once", MaxConns, err)
	}
	held[0].Write([]byte(`{"command":"status"}` + "\n"))
	if _, err := bufio.NewReader(held[0]).ReadString('\n'); err != nil {
		t.Fatal(err)
	}
	// The served connection is closed by the server, and its slot freed
	// after: retry until it is.
	for {
		err := Do(dctx, path, Request{Command: "status"}, func([]byte) error { return nil })
		if err == nil {
			break
		}
		if dctx.Err() != nil {
			t.Fatalf("no request answered after one of %d connections was done: %v", MaxConns, err)
		}
	}
}
