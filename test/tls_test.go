package test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis-agent/redis-agent/internal/testenv"
)

type keyPair struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	der  []byte
}

func newCert(t *testing.T, cn string, parent *keyPair, isCA bool) *keyPair {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{CommonName: cn},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1")},
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
	}
	if isCA {
		tpl.IsCA, tpl.BasicConstraintsValid = true, true
	}
	signer, signKey := tpl, key
	if parent != nil {
		signer, signKey = parent.cert, parent.key
	}
	der, err := x509.CreateCertificate(rand.Reader, tpl, signer, &key.PublicKey, signKey)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return &keyPair{cert: cert, key: key, der: der}
}

func (k *keyPair) write(t *testing.T, dir, name string) (certPath, keyPath string) {
	t.Helper()
	certPath, keyPath = filepath.Join(dir, name+".crt"), filepath.Join(dir, name+".key")
	os.WriteFile(certPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: k.der}), 0o600)
	kb, _ := x509.MarshalECPrivateKey(k.key)
	os.WriteFile(keyPath, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}), 0o600)
	return certPath, keyPath
}

// With mTLS, a client certificate signed by the client CA authenticates
// /v1; no certificate, or one from another CA, gets 401 (or no TLS at
// all), while /healthz stays open. The agent listens beyond loopback only
// because mTLS is configured.
func TestMutualTLS(t *testing.T) {
	testenv.RedisServer(t)
	dir := t.TempDir()
	ca := newCert(t, "agent-ca", nil, true)
	server := newCert(t, "agent", ca, false)
	client := newCert(t, "broker", ca, false)
	rogueCA := newCert(t, "rogue-ca", nil, true)
	rogue := newCert(t, "rogue", rogueCA, false)
	caPath, _ := ca.write(t, dir, "ca")
	srvCert, srvKey := server.write(t, dir, "server")

	port := testenv.FreePort(t)
	dataDir := testenv.TraversableDir(t)
	killRedisUnder(t, dataDir)
	a := launchAgent(t, agentOpts{dataDir: dataDir, extra: []string{
		"--listen", "0.0.0.0:" + strconv.Itoa(port), // beyond loopback: allowed because of mTLS
		"--tls-cert", srvCert, "--tls-key", srvKey, "--tls-client-ca", caPath,
	}})
	base := "https://127.0.0.1:" + strconv.Itoa(port)
	roots := x509.NewCertPool()
	roots.AddCert(ca.cert)
	httpsClient := func(kp *keyPair) *http.Client {
		tc := &tls.Config{RootCAs: roots}
		if kp != nil {
			tc.Certificates = []tls.Certificate{{Certificate: [][]byte{kp.der}, PrivateKey: kp.key}}
		}
		return &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: tc}}
	}
	get := func(c *http.Client, path string) int {
		resp, err := c.Get(base + path)
		if err != nil {
			return 0
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	testenv.Eventually(t, "HTTPS /readyz", settle, func() bool { return get(httpsClient(nil), "/readyz") == 200 })
	if code := get(httpsClient(nil), "/healthz"); code != 200 {
		t.Errorf("/healthz without a client certificate = %d, want 200", code)
	}
	if code := get(httpsClient(nil), "/v1/instances"); code != 401 {
		t.Errorf("/v1 without a client certificate = %d, want 401", code)
	}
	if code := get(httpsClient(rogue), "/v1/instances"); code == 200 {
		t.Errorf("/v1 with a certificate from another CA = %d, want refused", code)
	}
	if code := get(httpsClient(client), "/v1/instances"); code != 200 {
		t.Errorf("/v1 with the broker's certificate = %d, want 200", code)
	}
	if code := get(http.DefaultClient, "/healthz"); code != 0 {
		// plain HTTP to a TLS port gets a 400 from net/http, never data
		t.Logf("plain HTTP to the TLS port: %d", code)
	}
	a.stop(15)

	// Beyond loopback with no authentication at all: refused at start.
	out, err := exec.Command(agentBin, "--listen", "0.0.0.0:"+strconv.Itoa(port), "--data-dir", t.TempDir()).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "--tls-client-ca") || !strings.Contains(string(out), "--token-file") {
		t.Fatalf("non-loopback without auth: %v %q; want a refusal that says how to configure auth", err, out)
	}
}

// A token protects /v1 and, with --metrics-auth, /metrics.
func TestTokenAuth(t *testing.T) {
	testenv.RedisServer(t)
	dataDir := testenv.TraversableDir(t)
	killRedisUnder(t, dataDir)
	tokenFile := filepath.Join(t.TempDir(), "token")
	os.WriteFile(tokenFile, []byte("s3cret-token-0123456789\n"), 0o600)
	a := launchAgent(t, agentOpts{dataDir: dataDir, extra: []string{"--token-file", tokenFile, "--metrics-auth"}})
	testenv.Eventually(t, "readyz", settle, func() bool { code, _, _ := a.try("GET", "/readyz", ""); return code == 200 })
	call := func(path, token string) int {
		req, _ := http.NewRequest("GET", a.base+path, nil)
		if token != "" {
			req.Header.Set("Authorization", "Bearer "+token)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	for _, c := range []struct {
		path, token string
		want        int
	}{
		{"/v1/instances", "", 401},
		{"/v1/instances", "wrong", 401},
		{"/v1/instances", "s3cret-token-0123456789", 200},
		{"/metrics", "", 401},
		{"/metrics", "s3cret-token-0123456789", 200},
		{"/healthz", "", 200},
		{"/readyz", "", 200},
	} {
		if code := call(c.path, c.token); code != c.want {
			t.Errorf("GET %s with token %q = %d, want %d", c.path, c.token, code, c.want)
		}
	}
	out, _ := exec.Command(agentBin, "status", "--addr", strings.TrimPrefix(a.base, "http://"), "--token-file", tokenFile).CombinedOutput()
	if !strings.HasPrefix(string(out), "ID") {
		t.Errorf("status with the token file: %q", out)
	}
}
