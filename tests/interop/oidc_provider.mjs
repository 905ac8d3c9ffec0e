// panva/oidc-provider as a client-credentials authorization server for the
// interop tests: JWT access tokens for one resource, every client auth method.
//   node oidc_provider.mjs PORT CLIENTS_JSON [dpop-nonce|-] [TLS_CERT TLS_KEY]
// With "dpop-nonce", DPoP proofs at the token endpoint must carry a server
// nonce (RFC 9449 §8). DPoP itself is on (oidc-provider's default); clients
// with dpop_bound_access_tokens get JWT access tokens with cnf.jkt.
// With TLS_CERT and TLS_KEY it serves HTTPS, asks for client certificates and
// binds the tokens of tls_client_certificate_bound_access_tokens clients to
// them (RFC 8705 §3: cnf.x5t#S256); self_signed_tls_client_auth is accepted.
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as https from 'node:https';
import Provider from 'oidc-provider';

const port = Number(process.argv[2]);
const clients = JSON.parse(process.argv[3]);
const dpopNonce = process.argv[4] === 'dpop-nonce';
const tls = process.argv[5] ? { cert: fs.readFileSync(process.argv[5]), key: fs.readFileSync(process.argv[6]) } : null;
const resource = 'https://api.partner.example';
const issuer = `${tls ? 'https' : 'http'}://127.0.0.1:${port}`;

const provider = new Provider(issuer, {
  clients,
  clientAuthMethods: ['client_secret_basic', 'client_secret_post', 'client_secret_jwt', 'private_key_jwt', 'none',
    ...(tls ? ['self_signed_tls_client_auth'] : [])],
  scopes: ['orders.read'],
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    mTLS: {
      enabled: Boolean(tls),
      certificateBoundAccessTokens: true,
      selfSignedTlsClientAuth: true,
      getCertificate(ctx) {
        const peer = ctx.socket.getPeerCertificate();
        return peer && peer.raw ? new crypto.X509Certificate(peer.raw).toString() : undefined;
      },
    },
    dPoP: {
      enabled: true,
      nonceSecret: crypto.randomBytes(32),
      requireNonce: () => dpopNonce,
    },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => resource,
      useGrantedResource: () => true,
      getResourceServerInfo: () => ({
        scope: 'orders.read',
        audience: resource,
        accessTokenFormat: 'jwt',
        accessTokenTTL: 600,
      }),
    },
  },
});
if (tls) {
  https.createServer({ ...tls, requestCert: true, rejectUnauthorized: false }, provider.callback())
    .listen(port, '127.0.0.1', () => console.log(`listening ${issuer}`));
} else {
  provider.listen(port, '127.0.0.1', () => console.log(`listening ${issuer}`));
}
