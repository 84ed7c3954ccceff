package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/gobwas/ws"
	"github.com/gobwas/ws/wsutil"
)

// client is echo -connect URL: it sends each line of stdin as a text
// message, prints each reply, and ends the session at the end of stdin
// with the closing handshake. A way to try the server with no WebSocket
// tool at hand.
func client(url string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, br, _, err := ws.Dial(ctx, url)
	if err != nil {
		return err
	}
	defer conn.Close()
	var r io.Reader = conn
	if br != nil { // bytes the server sent right after its handshake
		r = br
	}
	rw := struct {
		io.Reader
		io.Writer
	}{r, conn}
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		if err := wsutil.WriteClientText(conn, in.Bytes()); err != nil {
			return err
		}
		reply, err := wsutil.ReadServerText(rw)
		if err != nil {
			return err
		}
		fmt.Printf("%s\n", reply)
	}
	if err := in.Err(); err != nil {
		return err
	}
	if err := wsutil.WriteClientMessage(conn, ws.OpClose, ws.NewCloseFrameBody(ws.StatusNormalClosure, "")); err != nil {
		return err
	}
	// The server's close answers ours.
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	for {
		h, err := ws.ReadHeader(r)
		if err != nil {
			return err
		}
		if _, err := io.CopyN(io.Discard, r, h.Length); err != nil {
			return err
		}
		if h.OpCode == ws.OpClose {
			return nil
		}
	}
}
