// Command httpexample drives netferry's gvproxy-compatible HTTP API over a unix socket with
// nothing but Go's net/http, the way podman's machine code and other gvproxy users do:
// list forwards, expose, list, unexpose, leases, add a DNS zone and list zones. Every reply
// is printed as one JSON line {"call", "status", "body"}; any unexpected status exits 1.
//
//	httpexample SOCKET LOCAL REMOTE
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"time"
)

type exposeRequest struct {
	Local    string `json:"local"`
	Remote   string `json:"remote"`
	Protocol string `json:"protocol,omitempty"`
}

type record struct {
	Name string
	IP   string
}

type zone struct {
	Name    string
	Records []record
}

func main() {
	if len(os.Args) != 4 {
		fmt.Fprintln(os.Stderr, "usage: httpexample SOCKET LOCAL REMOTE")
		os.Exit(2)
	}
	socket, local, remote := os.Args[1], os.Args[2], os.Args[3]
	client := &http.Client{
		Timeout: 20 * time.Second,
		Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "unix", socket)
			},
		},
	}
	failed := false
	call := func(name, method, path string, body any, want int) {
		var reader io.Reader
		if body != nil {
			data, err := json.Marshal(body)
			if err != nil {
				panic(err)
			}
			reader = bytes.NewReader(data)
		}
		req, err := http.NewRequest(method, "http://unix"+path, reader)
		if err != nil {
			panic(err)
		}
		if body != nil {
			req.Header.Set("Content-Type", "application/json")
		}
		res, err := client.Do(req)
		if err != nil {
			fmt.Fprintf(os.Stderr, "%s: %v\n", name, err)
			os.Exit(1)
		}
		data, _ := io.ReadAll(res.Body)
		res.Body.Close()
		line, _ := json.Marshal(map[string]any{"call": name, "status": res.StatusCode, "body": string(data)})
		fmt.Println(string(line))
		if res.StatusCode != want {
			failed = true
		}
	}
	call("all", "GET", "/services/forwarder/all", nil, 200)
	call("expose", "POST", "/services/forwarder/expose", exposeRequest{Local: local, Remote: remote}, 200)
	call("expose-again", "POST", "/services/forwarder/expose", exposeRequest{Local: local, Remote: remote}, 500)
	call("all-after-expose", "GET", "/services/forwarder/all", nil, 200)
	call("unexpose", "POST", "/services/forwarder/unexpose", exposeRequest{Local: local}, 200)
	call("all-after-unexpose", "GET", "/services/forwarder/all", nil, 200)
	call("leases", "GET", "/services/dhcp/leases", nil, 200)
	call("dns-add", "POST", "/services/dns/add", zone{Name: "go.internal.", Records: []record{{Name: "api", IP: "192.168.127.9"}}}, 200)
	call("dns-all", "GET", "/services/dns/all", nil, 200)
	if failed {
		os.Exit(1)
	}
}
